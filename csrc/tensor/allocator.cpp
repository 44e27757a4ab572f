// CachingAllocator bookkeeping (Note [Caching allocator rules]) and the per-device registry.
#include "tensor/allocator.h"

#include <fmt/format.h>

#include <exception>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/error.h"
#include "common/units.h"
#include "tensor/cuda_backend.h"

namespace gpufleet {

namespace {
constexpr std::size_t kSmallLimit = 1u << 20;
constexpr std::size_t kSmallRound = 512;
constexpr std::size_t kLargeRound = 2u << 20;
}  // namespace

CachingAllocator::CachingAllocator(std::string name, RawOps ops) : name_(std::move(name)), ops_(std::move(ops)) {
  GF_ASSERT(ops_.alloc && ops_.free, "CachingAllocator {} needs raw alloc and free functions", name_);
}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    process_pending_locked(/*wait=*/true);
    release_cached_locked();
  } catch (...) {  // a destructor must not throw; the failure was counted
  }
}

std::size_t CachingAllocator::round_size(std::size_t n) {
  if (n <= kSmallLimit) return (n + kSmallRound - 1) / kSmallRound * kSmallRound;
  return (n + kLargeRound - 1) / kLargeRound * kLargeRound;
}

void* CachingAllocator::allocate(std::size_t nbytes, std::uintptr_t stream) {
  if (nbytes == 0) return nullptr;
  const std::size_t size = round_size(nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
  process_pending_locked(/*wait=*/false);
  auto it = free_.lower_bound({stream, size, nullptr});
  void* ptr = nullptr;
  std::size_t got = 0;
  if (it != free_.end() && std::get<0>(*it) == stream && std::get<1>(*it) / 2 <= size) {
    got = std::get<1>(*it);
    ptr = std::get<2>(*it);
    free_.erase(it);
    stats_.cached_bytes -= got;
    stats_.cached_blocks--;
    stats_.num_cache_hits++;
  } else {
    ptr = ops_.alloc(size);
    if (!ptr && (!free_.empty() || !pending_.empty())) {
      stats_.num_oom_retries++;
      process_pending_locked(/*wait=*/true);
      release_cached_locked();
      ptr = ops_.alloc(size);
    }
    if (!ptr)
      throw OutOfMemoryError(fmt::format(
          "{}: out of memory allocating {} ({} bytes): {} allocated, {} reserved by gpufleet, {} cached",
          name_, format_memory_size(size), nbytes, format_memory_size(stats_.allocated_bytes),
          format_memory_size(stats_.reserved_bytes), format_memory_size(stats_.cached_bytes)));
    got = size;
    stats_.num_raw_allocs++;
    stats_.reserved_bytes += got;
    stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
  }
  active_.emplace(ptr, Block{got, stream, {}});
  stats_.num_allocs++;
  stats_.active_blocks++;
  stats_.allocated_bytes += got;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  return ptr;
}

CachingAllocator::Block CachingAllocator::take_active_locked(void* ptr) {
  auto it = active_.find(ptr);
  GF_CHECK_ARG(it != active_.end(), "{}: pointer {} was not allocated here (or was already freed)", name_, ptr);
  Block b = std::move(it->second);
  active_.erase(it);
  stats_.num_frees++;
  stats_.active_blocks--;
  stats_.allocated_bytes -= b.size;
  return b;
}

void CachingAllocator::cache_locked(void* ptr, const Block& b) {
  free_.emplace(b.stream, b.size, ptr);
  stats_.cached_bytes += b.size;
  stats_.cached_blocks++;
}

void CachingAllocator::defer_locked(void* ptr, Block b, std::vector<std::uintptr_t> events) {
  stats_.pending_blocks++;
  stats_.pending_bytes += b.size;
  pending_.push_back({ptr, std::move(b), std::move(events)});
}

void CachingAllocator::deallocate(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Block b = take_active_locked(ptr);
  if (b.uses.empty()) {
    cache_locked(ptr, b);
    return;
  }
  // Note [record_stream]: one event per stream that used the block, recorded now.
  std::vector<std::uintptr_t> events;
  try {
    for (auto s : b.uses) events.push_back(ops_.record_event(s));
  } catch (...) {
    // The block cannot be proven idle: forget it rather than reuse it (a leak, never a hazard).
    for (auto e : events) ops_.event_release(e);
    stats_.reserved_bytes -= b.size;
    throw;
  }
  defer_locked(ptr, std::move(b), std::move(events));
}

void CachingAllocator::record_stream(void* ptr, std::uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  GF_CHECK_ARG(ops_.record_event && ops_.event_done && ops_.event_wait && ops_.event_release,
               "{}: record_stream needs events, which this allocator has none of", name_);
  auto it = active_.find(ptr);
  GF_CHECK_ARG(it != active_.end(), "{}: record_stream: pointer {} is not an allocated block", name_, ptr);
  Block& b = it->second;
  if (stream == b.stream) return;
  for (auto s : b.uses)
    if (s == stream) return;
  b.uses.push_back(stream);
}

void CachingAllocator::deallocate_after(void* ptr, std::vector<std::uintptr_t> events) {
  if (!ptr) {
    for (auto e : events) ops_.event_release(e);
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  GF_CHECK_ARG(ops_.event_done && ops_.event_wait && ops_.event_release,
               "{}: deallocate_after needs events, which this allocator has none of", name_);
  Block b;
  try {
    b = take_active_locked(ptr);
    for (auto s : b.uses) events.push_back(ops_.record_event(s));
  } catch (...) {
    for (auto e : events) ops_.event_release(e);
    throw;
  }
  if (events.empty())
    cache_locked(ptr, b);
  else
    defer_locked(ptr, std::move(b), std::move(events));
}

void CachingAllocator::process_pending_locked(bool wait) {
  if (pending_.empty()) return;
  std::vector<Pending> still;
  std::exception_ptr first;
  for (auto& p : pending_) {
    bool done = true;
    try {
      for (auto e : p.events) {
        if (wait) {
          ops_.event_wait(e);
        } else if (!ops_.event_done(e)) {
          done = false;
          break;
        }
      }
    } catch (...) {
      // The device cannot say the work finished: forget the block (a leak, never a reuse hazard).
      if (!first) first = std::current_exception();
      for (auto e : p.events) {
        try {
          ops_.event_release(e);
        } catch (...) {
        }
      }
      stats_.pending_blocks--;
      stats_.pending_bytes -= p.block.size;
      stats_.reserved_bytes -= p.block.size;
      continue;
    }
    if (!done) {
      still.push_back(std::move(p));
      continue;
    }
    for (auto e : p.events) ops_.event_release(e);
    stats_.pending_blocks--;
    stats_.pending_bytes -= p.block.size;
    cache_locked(p.ptr, p.block);
  }
  pending_ = std::move(still);
  if (first) std::rethrow_exception(first);
}

void CachingAllocator::release_cached_locked() {
  // Each block leaves the books before its raw free runs, so a free that throws can never leave a
  // freed pointer in the cache for the next allocation to hand out.
  std::exception_ptr first;
  while (!free_.empty()) {
    const auto [stream, size, ptr] = *free_.begin();
    free_.erase(free_.begin());
    stats_.cached_bytes -= size;
    stats_.cached_blocks--;
    stats_.reserved_bytes -= size;
    try {
      ops_.free(ptr, size);
      stats_.num_raw_frees++;
    } catch (...) {
      stats_.num_raw_free_failures++;
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  process_pending_locked(/*wait=*/true);
  release_cached_locked();
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void CachingAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
}

// ---- registry ---------------------------------------------------------------------------------
// Allocators live for the whole process (never destroyed): tensors may outlive static destructors,
// e.g. when Python frees them at interpreter shutdown.
namespace {
std::mutex registry_mutex;
std::map<int, CachingAllocator*>& device_allocators() {
  static auto* m = new std::map<int, CachingAllocator*>();
  return *m;
}

#if GPUFLEET_WITH_CUDA
void cuda_event_ops(CachingAllocator::RawOps& ops, int device) {
  if (device >= 0)
    ops.record_event = [device](std::uintptr_t stream) {
      const std::uintptr_t e = cuda_backend::event_create(device, false);
      try {
        cuda_backend::event_record(device, e, stream);
      } catch (...) {
        cuda_backend::event_destroy(device, e);
        throw;
      }
      return e;
    };
  ops.event_done = [](std::uintptr_t e) { return cuda_backend::event_query(e); };
  ops.event_wait = [](std::uintptr_t e) { cuda_backend::event_synchronize(e); };
  ops.event_release = [](std::uintptr_t e) { cuda_backend::event_destroy(-1, e); };
}
#endif

CachingAllocator::RawOps device_ops(int index) {
#if GPUFLEET_WITH_CUDA
  CachingAllocator::RawOps ops;
  ops.alloc = [index](std::size_t n) { return cuda_backend::raw_device_alloc(index, n); };
  ops.free = [index](void* p, std::size_t) { cuda_backend::raw_device_free(index, p); };
  cuda_event_ops(ops, index);
  return ops;
#else
  CachingAllocator::RawOps ops;
  ops.alloc = [index](std::size_t) -> void* { throw_no_cuda(fmt::format("cannot allocate memory on cuda:{}", index)); };
  ops.free = [](void*, std::size_t) {};
  return ops;
#endif
}

CachingAllocator::RawOps pinned_ops() {
#if GPUFLEET_WITH_CUDA
  // Pinned blocks take events recorded by their users (deallocate_after), on any device.
  CachingAllocator::RawOps ops;
  ops.alloc = [](std::size_t n) { return cuda_backend::raw_pinned_alloc(n); };
  ops.free = [](void* p, std::size_t) { cuda_backend::raw_pinned_free(p); };
  cuda_event_ops(ops, -1);
  return ops;
#else
  CachingAllocator::RawOps ops;
  ops.alloc = [](std::size_t) -> void* { throw_no_cuda("pinned (page-locked) host memory needs the CUDA runtime"); };
  ops.free = [](void*, std::size_t) {};
  return ops;
#endif
}
}  // namespace

CachingAllocator& device_allocator(int index) {
  GF_CHECK_ARG(index >= 0, "invalid CUDA device index {}", index);
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& m = device_allocators();
  auto it = m.find(index);
  if (it == m.end()) it = m.emplace(index, new CachingAllocator(fmt::format("cuda:{}", index), device_ops(index))).first;
  return *it->second;
}

CachingAllocator& pinned_allocator() {
  static auto* a = new CachingAllocator("pinned host memory", pinned_ops());
  return *a;
}

AllocatorStats device_memory_stats(int index) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& m = device_allocators();
    auto it = m.find(index);
    if (it == m.end()) return {};
  }
  return device_allocator(index).stats();
}

AllocatorStats pinned_memory_stats() { return pinned_allocator().stats(); }

void empty_all_caches() {
  std::vector<CachingAllocator*> all;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    for (auto& [i, a] : device_allocators()) all.push_back(a);
  }
  all.push_back(&pinned_allocator());
  // Every allocator is emptied even when one of them fails; the first failure is rethrown.
  std::exception_ptr first;
  for (auto* a : all) {
    try {
      a->empty_cache();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace gpufleet
