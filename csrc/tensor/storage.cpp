// Storage lifetime, allocation by memory kind, and the CPU-only "built without CUDA" error.
#include "tensor/storage.h"

#include <sys/mman.h>

#include <cstdlib>
#include <stdexcept>

#include "common/error.h"
#include "tensor/allocator.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"

namespace gpufleet {

void throw_no_cuda(const std::string& what) {
  throw std::runtime_error(fmt::format(
      "gpufleet was built without CUDA: {} (rebuild with GPUFLEET_CUDA=ON on a machine with the CUDA "
      "toolkit, or keep the data on 'cpu')",
      what));
}

std::string_view memory_kind_name(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::Pageable: return "pageable";
    case MemoryKind::Pinned: return "pinned";
    case MemoryKind::Device: return "device";
  }
  return "?";
}

Storage::Storage(void* data, std::size_t nbytes, Device device, MemoryKind kind, Deleter deleter)
    : data_(data), nbytes_(nbytes), device_(device), kind_(kind), deleter_(std::move(deleter)) {}

Storage::~Storage() {
  // Note [Host reads wait for copies]: a pinned block goes back to the pool only after its copies.
  try {
    wait_pending();
  } catch (...) {  // a failed wait (device lost) must not stop the memory from being released
  }
  if (deleter_) {
    try {
      deleter_(data_);
    } catch (...) {
    }
  }
}

void Storage::set_pending(std::shared_ptr<PendingWork> work) {
  std::lock_guard<std::mutex> lock(mutex_);
  pending_ = std::move(work);
}

void Storage::wait_pending() {
  std::shared_ptr<PendingWork> work;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    work = std::move(pending_);
    pending_.reset();
  }
  if (work) work->wait();
}

void Storage::record_stream(std::uintptr_t stream) const {
  if (recorder_) recorder_(stream);
}

bool Storage::has_pending() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_ != nullptr;
}

std::shared_ptr<Storage> wrap_storage(void* data, std::size_t nbytes, Device device, MemoryKind kind,
                                      Storage::Deleter deleter) {
  return std::make_shared<Storage>(data, nbytes, device, kind, std::move(deleter));
}

std::shared_ptr<Storage> allocate_storage(std::size_t nbytes, Device device, MemoryKind kind) {
  switch (kind) {
    case MemoryKind::Pageable: {
      GF_ASSERT(device.is_cpu(), "pageable memory on {}", device.str());
      void* p = nullptr;
      if (nbytes > 0) {
        // Large buffers: 2 MiB aligned and backed by transparent huge pages where the kernel allows
        // it (NumPy does the same above 4 MiB): far fewer page faults on first touch.
        constexpr std::size_t kHuge = 2u << 20;
        const bool huge = nbytes >= (4u << 20);
        const std::size_t align = huge ? kHuge : 64;
        const std::size_t size = (nbytes + align - 1) / align * align;
        p = std::aligned_alloc(align, size);
        if (!p)
          throw OutOfMemoryError(fmt::format("out of host memory allocating {} bytes", nbytes));
#ifdef MADV_HUGEPAGE
        if (huge) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
      }
      return wrap_storage(p, nbytes, Device::cpu(), kind, [](void* q) { std::free(q); });
    }
    case MemoryKind::Pinned: {
      GF_ASSERT(device.is_cpu(), "pinned memory on {}", device.str());
#if !GPUFLEET_WITH_CUDA
      throw_no_cuda("pinned (page-locked) host memory needs the CUDA runtime");
#else
      cuda_backend::check_device(-1, "pinned (page-locked) host memory needs the CUDA runtime");
      auto& pool = pinned_allocator();
      void* p = pool.allocate(nbytes);
      return wrap_storage(p, nbytes, Device::cpu(), kind, [&pool](void* q) { pool.deallocate(q); });
#endif
    }
    case MemoryKind::Device: {
      GF_ASSERT(device.is_cuda() && device.has_index(), "device memory on {}", device.str());
#if !GPUFLEET_WITH_CUDA
      throw_no_cuda(fmt::format("cannot allocate memory on {}", device.str()));
#else
      cuda_backend::check_device(device.index, fmt::format("cannot allocate memory on {}", device.str()).c_str());
      auto& alloc = device_allocator(device.index);
      void* p = alloc.allocate(nbytes, current_stream(device.index).handle());
      auto storage = wrap_storage(p, nbytes, device, kind, [&alloc](void* q) { alloc.deallocate(q); });
      if (p) storage->set_stream_recorder([&alloc, p](std::uintptr_t s) { alloc.record_stream(p, s); });
      return storage;
#endif
    }
  }
  GF_ASSERT(false, "unknown memory kind");
}

}  // namespace gpufleet
