#pragma once
/// Reference-counted tensor storage: host pageable, host pinned or device memory, or memory owned by
/// someone else (a NumPy array, a DLPack producer) and released through a deleter.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>

#include "device/device.h"

namespace gpufleet {

enum class MemoryKind : std::uint8_t { Pageable, Pinned, Device };
std::string_view memory_kind_name(MemoryKind kind);

/// Work in flight (an asynchronous copy) that reads or writes a storage's bytes.
class PendingWork {
 public:
  virtual ~PendingWork() = default;
  /// Blocks until the work has finished.
  virtual void wait() = 0;
};

/// A block of memory and how to release it. Tensors and views share one Storage through
/// std::shared_ptr, so a view keeps its storage alive after the tensor it came from is gone.
///
/// Note [Host reads wait for copies]: an asynchronous copy (non_blocking=True) that touches host
/// memory records its completion on the host-side Storage with set_pending(). Every gpufleet path that
/// reads or writes host bytes (numpy(), __dlpack__, CPU copies, the destructor before it recycles a
/// pinned block) calls wait_pending() first, so nothing reads a host buffer before its copy finished
/// and a pinned block is never reused while a copy still reads it.
class Storage {
 public:
  using Deleter = std::function<void(void*)>;

  Storage(void* data, std::size_t nbytes, Device device, MemoryKind kind, Deleter deleter);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const noexcept { return data_; }
  std::size_t nbytes() const noexcept { return nbytes_; }
  const Device& device() const noexcept { return device_; }
  MemoryKind kind() const noexcept { return kind_; }

  /// Records work that must finish before the host touches these bytes (replaces any earlier one,
  /// which was ordered before it on the same stream or already waited for).
  void set_pending(std::shared_ptr<PendingWork> work);
  /// Waits for pending work, if any, and forgets it.
  void wait_pending();
  bool has_pending() const;

  /// Note [record_stream]: the caching allocator that owns these bytes is told that work on `stream`
  /// uses them, so the block is not reused before that work finishes. Memory gpufleet does not own
  /// (imported through DLPack, wrapped NumPy arrays) is its owner's to manage: no-op.
  void record_stream(std::uintptr_t stream) const;
  /// Set by allocate_storage for blocks of a caching allocator.
  void set_stream_recorder(std::function<void(std::uintptr_t)> recorder) { recorder_ = std::move(recorder); }

 private:
  void* data_;
  std::size_t nbytes_;
  Device device_;
  MemoryKind kind_;
  Deleter deleter_;
  std::function<void(std::uintptr_t)> recorder_;
  mutable std::mutex mutex_;
  std::shared_ptr<PendingWork> pending_;
};

/// Allocates `nbytes` of the given kind: pageable host memory (64-byte aligned), pinned host memory
/// from the pinned pool, or device memory from that device's caching allocator (on the device's
/// current stream). Pinned and device memory need CUDA: without it this throws a clear error.
std::shared_ptr<Storage> allocate_storage(std::size_t nbytes, Device device, MemoryKind kind);

/// Wraps memory owned elsewhere; `deleter(data)` runs when the last tensor using it is gone.
std::shared_ptr<Storage> wrap_storage(void* data, std::size_t nbytes, Device device, MemoryKind kind,
                                      Storage::Deleter deleter);

}  // namespace gpufleet
