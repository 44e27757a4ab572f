#pragma once
/// Caching allocators: freed blocks are kept and reused instead of going back to the driver, as in
/// PyTorch's CUDA caching allocator and RMM's pool. The bookkeeping (CachingAllocator) takes the raw
/// allocation functions as callbacks, so the C++ tests drive it with malloc; CUDA plugs in cudaMalloc
/// per device and cudaHostAlloc for the pinned host pool (allocator_cuda.cpp).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace gpufleet {

/// Raised when memory cannot be had even after the cache was emptied (Python MemoryError).
class OutOfMemoryError : public std::bad_alloc {
 public:
  explicit OutOfMemoryError(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

struct AllocatorStats {
  std::uint64_t allocated_bytes = 0;       ///< bytes in blocks handed out now (rounded sizes)
  std::uint64_t peak_allocated_bytes = 0;
  std::uint64_t reserved_bytes = 0;        ///< bytes obtained from the raw allocator and not released
  std::uint64_t peak_reserved_bytes = 0;
  std::uint64_t cached_bytes = 0;          ///< reserved but free, ready for reuse
  std::uint64_t num_allocs = 0;            ///< allocate() calls that returned memory
  std::uint64_t num_frees = 0;
  std::uint64_t num_cache_hits = 0;        ///< allocations served from a cached block
  std::uint64_t num_raw_allocs = 0;        ///< calls to the raw allocator that succeeded
  std::uint64_t num_raw_frees = 0;
  std::uint64_t num_oom_retries = 0;       ///< raw allocation failed, cache emptied, retried
  std::uint64_t num_raw_free_failures = 0; ///< raw frees that threw (the block is forgotten, never reused)
  std::uint64_t active_blocks = 0;
  std::uint64_t cached_blocks = 0;
  std::uint64_t pending_blocks = 0;        ///< freed, waiting for the events of their other streams' work
  std::uint64_t pending_bytes = 0;
};

/// Note [Caching allocator rules]
/// - Sizes are rounded up: to 512 bytes below 1 MiB, to 2 MiB above (bounded fragmentation).
/// - A freed block serves a later request on the same stream key whose rounded size is at least half
///   the block (best fit: the smallest such block). Stream keys keep reuse ordered: work on one stream
///   that used the old block runs before work enqueued later on that stream on the new owner.
/// - When the raw allocator fails, every cached block is released and the allocation retried once;
///   a second failure throws OutOfMemoryError naming the request and the allocator's state.
/// - Blocks are never split or merged; empty_cache() releases every cached block.
/// - Note [record_stream]: a block used on a stream other than the one it was allocated on is
///   recorded with record_stream(ptr, stream) (PyTorch's Tensor.record_stream). When it is freed, an
///   event is recorded on each such stream (so the stream must still exist then, as in PyTorch) and
///   the block waits in a pending list; it returns to its stream's free list once every event has
///   completed (polled at each allocation, waited for on empty_cache() and before an out-of-memory
///   retry). deallocate_after(ptr, events) does the same with events the caller recorded itself,
///   when the streams may be gone by the time the block is freed (csrc/kernels' results).
/// - A raw free that throws (cudaFree failing on a broken context) never leaves the pointer in the
///   cache: every block is taken off the books before its raw free runs, the failure is counted
///   (num_raw_free_failures) and the first error is rethrown once the others were released.
class CachingAllocator {
 public:
  struct RawOps {
    /// Returns nullptr when out of memory; throws for any other failure.
    std::function<void*(std::size_t)> alloc;
    std::function<void(void*, std::size_t)> free;
    // Events, as opaque handles (optional: without them record_stream() and deallocate_after() throw).
    std::function<std::uintptr_t(std::uintptr_t stream)> record_event;  ///< a new event recorded on `stream` now
    std::function<bool(std::uintptr_t event)> event_done;               ///< true once it has completed
    std::function<void(std::uintptr_t event)> event_wait;               ///< blocks until it has completed
    std::function<void(std::uintptr_t event)> event_release;            ///< destroys it
  };

  CachingAllocator(std::string name, RawOps ops);
  /// Releases cached blocks; blocks still in use are left alone (their owners free them later).
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  /// Returns a block of at least `nbytes` (nullptr for 0 bytes).
  void* allocate(std::size_t nbytes, std::uintptr_t stream = 0);
  /// Returns a block from allocate() to the cache (after the events of its recorded streams, if any).
  /// Throws std::invalid_argument for a foreign pointer.
  void deallocate(void* ptr);
  /// Marks the block as used by work on `stream` (Note [record_stream]); no-op for its own stream.
  void record_stream(void* ptr, std::uintptr_t stream);
  /// Like deallocate(), but the block is reused only after `events` (handles for RawOps' event
  /// functions, owned by the allocator from now on) have completed.
  void deallocate_after(void* ptr, std::vector<std::uintptr_t> events);
  /// Waits for pending blocks, then releases every cached (free) block to the raw allocator.
  void empty_cache();
  AllocatorStats stats() const;
  void reset_peak_stats();
  const std::string& name() const { return name_; }

  static std::size_t round_size(std::size_t nbytes);

 private:
  struct Block {
    std::size_t size;
    std::uintptr_t stream;
    std::vector<std::uintptr_t> uses;  // other streams that used it (record_stream)
  };
  struct Pending {
    void* ptr;
    Block block;
    std::vector<std::uintptr_t> events;
  };
  Block take_active_locked(void* ptr);
  void cache_locked(void* ptr, const Block& b);
  void defer_locked(void* ptr, Block b, std::vector<std::uintptr_t> events);
  /// Moves pending blocks whose events completed to the free lists; `wait` waits for all of them.
  void process_pending_locked(bool wait);
  void release_cached_locked();

  std::string name_;
  RawOps ops_;
  mutable std::mutex mutex_;
  std::unordered_map<void*, Block> active_;
  std::set<std::tuple<std::uintptr_t, std::size_t, void*>> free_;  // (stream, size, ptr)
  std::vector<Pending> pending_;
  AllocatorStats stats_;
};

/// The caching allocator of CUDA device `index` (created on first use; needs CUDA at allocation).
CachingAllocator& device_allocator(int index);
/// The pinned host memory pool.
CachingAllocator& pinned_allocator();
/// Stats of device `index` (zeros if it never allocated).
AllocatorStats device_memory_stats(int index);
AllocatorStats pinned_memory_stats();
/// Releases the cached blocks of every device allocator and of the pinned pool.
void empty_all_caches();

}  // namespace gpufleet
