// CachingAllocator bookkeeping (Note [Caching allocator rules]) and the per-device registry.
#include "tensor/allocator.h"

#include <fmt/format.h>

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
  release_cached_locked();
}

std::size_t CachingAllocator::round_size(std::size_t n) {
  if (n <= kSmallLimit) return (n + kSmallRound - 1) / kSmallRound * kSmallRound;
  return (n + kLargeRound - 1) / kLargeRound * kLargeRound;
}

void* CachingAllocator::allocate(std::size_t nbytes, std::uintptr_t stream) {
  if (nbytes == 0) return nullptr;
  const std::size_t size = round_size(nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
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
    if (!ptr && !free_.empty()) {
      stats_.num_oom_retries++;
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
  active_.emplace(ptr, Block{got, stream});
  stats_.num_allocs++;
  stats_.active_blocks++;
  stats_.allocated_bytes += got;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  return ptr;
}

void CachingAllocator::deallocate(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = active_.find(ptr);
  GF_CHECK_ARG(it != active_.end(), "{}: pointer {} was not allocated here (or was already freed)", name_, ptr);
  const Block b = it->second;
  active_.erase(it);
  free_.emplace(b.stream, b.size, ptr);
  stats_.num_frees++;
  stats_.active_blocks--;
  stats_.allocated_bytes -= b.size;
  stats_.cached_bytes += b.size;
  stats_.cached_blocks++;
}

void CachingAllocator::release_cached_locked() {
  for (const auto& [stream, size, ptr] : free_) {
    ops_.free(ptr, size);
    stats_.num_raw_frees++;
    stats_.reserved_bytes -= size;
  }
  free_.clear();
  stats_.cached_bytes = 0;
  stats_.cached_blocks = 0;
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
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

CachingAllocator::RawOps device_ops(int index) {
#if GPUFLEET_WITH_CUDA
  return {[index](std::size_t n) { return cuda_backend::raw_device_alloc(index, n); },
          [index](void* p, std::size_t) { cuda_backend::raw_device_free(index, p); }};
#else
  return {[index](std::size_t) -> void* { throw_no_cuda(fmt::format("cannot allocate memory on cuda:{}", index)); },
          [](void*, std::size_t) {}};
#endif
}

CachingAllocator::RawOps pinned_ops() {
#if GPUFLEET_WITH_CUDA
  return {[](std::size_t n) { return cuda_backend::raw_pinned_alloc(n); },
          [](void* p, std::size_t) { cuda_backend::raw_pinned_free(p); }};
#else
  return {[](std::size_t) -> void* { throw_no_cuda("pinned (page-locked) host memory needs the CUDA runtime"); },
          [](void*, std::size_t) {}};
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
  for (auto* a : all) a->empty_cache();
  pinned_allocator().empty_cache();
}

}  // namespace gpufleet
