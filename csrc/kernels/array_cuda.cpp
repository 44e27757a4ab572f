// Device memory of the CUDA kernels (CUDA builds only): the per-device backend (Note [Kernel memory
// backend]), scratch, uploads through pinned staging, production events and result lifetimes
// (Note [Kernel result lifetimes]), all in device_memory.h.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/error.h"
#include "kernels/array.h"
#include "kernels/cuda_util.h"
#include "kernels/device_memory.h"
#include "tensor/allocator.h"

namespace gpufleet::kernels {

void raise_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  (void)cudaGetLastError();
  throw CudaError(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(status), cudaGetErrorString(status),
                              expr, file, line),
                  static_cast<int>(status));
}

namespace {

// One per device, created on first use and never destroyed (results may be released during
// interpreter shutdown, after static destructors).
struct DeviceMemory {
  int device = 0;
  MemoryBackend backend = MemoryBackend::Caching;
  cudaMemPool_t pool = nullptr;
  cudaStream_t release_stream = nullptr;  // gpufleet's own: releases wait and free here
  std::atomic<std::uint64_t> live_results{0};
  std::atomic<std::uint64_t> failed_releases{0};
};

std::mutex memory_mutex;
std::map<int, DeviceMemory*>& memories() {
  static auto* m = new std::map<int, DeviceMemory*>();
  return *m;
}

DeviceMemory* find_memory(int device) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto it = memories().find(device);
  return it == memories().end() ? nullptr : it->second;
}

DeviceMemory& device_memory(int device) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto& all = memories();
  if (auto it = all.find(device); it != all.end()) return *it->second;
  auto dm = std::make_unique<DeviceMemory>();
  dm->device = device;
  int supported = 0;
  GFK_CUDA_TRY(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
  dm->backend = choose_memory_backend(supported != 0, std::getenv("GPUFLEET_KERNELS_MEMORY"));
  DeviceGuard guard(device);
  if (dm->backend == MemoryBackend::AsyncPool) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    GFK_CUDA_TRY(cudaMemPoolCreate(&dm->pool, &props));
    std::uint64_t threshold = kPoolReleaseThreshold;
    GFK_CUDA_TRY(cudaMemPoolSetAttribute(dm->pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  }
  GFK_CUDA_TRY(cudaStreamCreateWithFlags(&dm->release_stream, cudaStreamNonBlocking));
  return *all.emplace(device, dm.release()).first->second;
}

int current_device() {
  int d = 0;
  GFK_CUDA_TRY(cudaGetDevice(&d));
  return d;
}

// An event on `stream` now (the caller has made the stream's device current).
cudaEvent_t record_now(cudaStream_t stream) {
  cudaEvent_t e = nullptr;
  GFK_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  const cudaError_t r = cudaEventRecord(e, stream);
  if (r != cudaSuccess) {
    (void)cudaEventDestroy(e);
    raise_cuda_error(r, "cudaEventRecord", __FILE__, __LINE__);
  }
  return e;
}

void* raw_alloc(DeviceMemory& dm, std::size_t bytes, cudaStream_t stream) {
  if (dm.backend == MemoryBackend::Caching)
    return device_allocator(dm.device).allocate(bytes, reinterpret_cast<std::uintptr_t>(stream));
  void* p = nullptr;
  cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, dm.pool, stream);
  if (e == cudaErrorMemoryAllocation) {
    // gpufleet tensors' cached blocks may hold the memory: give them back and try once more.
    (void)cudaGetLastError();
    device_allocator(dm.device).empty_cache();
    e = cudaMallocFromPoolAsync(&p, bytes, dm.pool, stream);
  }
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    throw OutOfMemoryError(fmt::format("cuda:{}: out of memory allocating {} bytes for a kernel", dm.device, bytes));
  }
  GFK_CUDA_TRY(e);
  return p;
}

}  // namespace

// ---- scratch and uploads (cuda_util.h) ----------------------------------------------------------------

void* scratch_alloc(std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  return raw_alloc(device_memory(current_device()), bytes, stream);
}

void scratch_free(int device, void* p, cudaStream_t stream) noexcept {
  if (!p) return;
  try {
    DeviceMemory& dm = device_memory(device);
    if (dm.backend == MemoryBackend::AsyncPool) {
      GFK_CUDA_TRY(cudaFreeAsync(p, stream));  // stream-ordered after the kernels that used it
    } else if (stream == cudaStreamPerThread) {
      // The per-thread default stream is another stream in every thread: no stream key can order the
      // reuse, an event does.
      device_allocator(device).deallocate_after(p, {reinterpret_cast<std::uintptr_t>(record_now(stream))});
    } else {
      device_allocator(device).deallocate(p);  // reused on the same stream only: ordered
    }
  } catch (...) {
    if (auto* dm = find_memory(device)) dm->failed_releases++;
  }
}

void upload_async(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  // Pinned staging: the copy is truly asynchronous (a pageable source would make the runtime stage
  // it and may block the host); the block goes back to the pinned pool once the copy has run.
  CachingAllocator& pinned = pinned_allocator();
  void* staging = pinned.allocate(bytes);
  std::memcpy(staging, src, bytes);
  cudaEvent_t done = nullptr;
  try {
    GFK_CUDA_TRY(cudaMemcpyAsync(dst, staging, bytes, cudaMemcpyHostToDevice, stream));
    done = record_now(stream);
  } catch (...) {
    // Nothing is known to read the block if the copy could not be queued; if it was queued but the
    // event failed, wait for the stream before reuse.
    (void)cudaStreamSynchronize(stream);
    (void)cudaGetLastError();
    pinned.deallocate(staging);
    throw;
  }
  pinned.deallocate_after(staging, {reinterpret_cast<std::uintptr_t>(done)});
}

// ---- production events --------------------------------------------------------------------------------

class Production {
 public:
  cudaEvent_t event = nullptr;
  ~Production() {
    if (event && cudaEventDestroy(event) != cudaSuccess) (void)cudaGetLastError();
  }
};

std::shared_ptr<Production> record_production(Device device, std::uintptr_t stream) {
  if (!device.is_cuda()) return nullptr;
  DeviceGuard guard(device.index);
  auto p = std::make_shared<Production>();
  p->event = record_now(as_stream(stream));
  return p;
}

bool production_done(const std::shared_ptr<Production>& p) {
  if (!p) return true;
  const cudaError_t e = cudaEventQuery(p->event);
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  GFK_CUDA_TRY(e);
  return true;
}

void wait_production(const std::shared_ptr<Production>& p) {
  if (p) GFK_CUDA_TRY(cudaEventSynchronize(p->event));
}

// ---- results ------------------------------------------------------------------------------------------

struct ResultLifetime {
  int device = 0;
  std::uintptr_t stream = 0;
  std::thread::id thread = std::this_thread::get_id();
  std::shared_ptr<void> stream_owner;
  std::mutex mutex;
  std::shared_ptr<Production> produced;
  std::vector<std::uintptr_t> uses;  // record_stream
};

namespace {

// Note [Kernel result lifetimes]: the events the release waits for, recorded now where that is safe.
// Throws on a CUDA error; fresh events go to `fresh` (destroyed by the caller).
void release_waits(ResultLifetime& lt, std::vector<cudaEvent_t>& fresh, std::vector<cudaEvent_t>& waits) {
  std::lock_guard<std::mutex> lock(lt.mutex);
  // The per-thread default stream (2) is the releasing thread's own: only the producing thread may
  // name it, whoever holds the owner (CuPy's Stream.ptds object, say).
  const bool stream_exists = lt.stream == 2 ? lt.thread == std::this_thread::get_id()
                                            : lt.stream_owner != nullptr || lt.stream == 0 || lt.stream == 1;
  if (stream_exists) {
    fresh.push_back(record_now(as_stream(lt.stream)));
    waits.push_back(fresh.back());
  } else if (lt.produced) {
    waits.push_back(lt.produced->event);
  }
  for (auto s : lt.uses) {
    fresh.push_back(record_now(as_stream(s)));
    waits.push_back(fresh.back());
  }
}

void release_result(void* p, ResultLifetime& lt) noexcept {
  DeviceMemory* dm = find_memory(lt.device);
  if (!dm) return;  // cannot happen: the memory came from it
  std::vector<cudaEvent_t> fresh, waits;
  try {
    DeviceGuard guard(lt.device);
    release_waits(lt, fresh, waits);
    for (cudaEvent_t e : waits) GFK_CUDA_TRY(cudaStreamWaitEvent(dm->release_stream, e, 0));
    if (dm->backend == MemoryBackend::AsyncPool) {
      GFK_CUDA_TRY(cudaFreeAsync(p, dm->release_stream));
    } else {
      const cudaEvent_t after = record_now(dm->release_stream);
      device_allocator(lt.device).deallocate_after(p, {reinterpret_cast<std::uintptr_t>(after)});
    }
  } catch (...) {
    // The memory cannot be proven idle: it is leaked rather than reused. Counted, never silent.
    dm->failed_releases++;
  }
  for (cudaEvent_t e : fresh)
    if (cudaEventDestroy(e) != cudaSuccess) (void)cudaGetLastError();  // deferred until completion
  dm->live_results--;
  lt.stream_owner.reset();  // after the events: the stream may be destroyed from here on
}

}  // namespace

Buffer allocate_cuda(Device device, DType dtype, std::vector<std::int64_t> shape, std::uintptr_t stream,
                     std::shared_ptr<void> stream_owner) {
  DeviceGuard guard(device.index);
  DeviceMemory& dm = device_memory(device.index);
  Buffer b;
  b.ref.dtype = dtype;
  b.ref.shape = std::move(shape);
  b.ref.device = device;
  b.ref.stream = stream;
  const std::size_t bytes = static_cast<std::size_t>(b.ref.numel()) * dtype_size(dtype);
  auto lt = std::make_shared<ResultLifetime>();
  lt->device = device.index;
  lt->stream = stream;
  lt->stream_owner = std::move(stream_owner);
  void* p = bytes ? raw_alloc(dm, bytes, as_stream(stream)) : nullptr;
  if (p) dm.live_results++;
  b.storage = std::shared_ptr<void>(p, [lt](void* q) {
    if (q) release_result(q, *lt);
  });
  b.ref.data = p;
  b.lifetime = std::move(lt);
  return b;
}

void set_produced(const Buffer& b, std::shared_ptr<Production> produced) {
  if (!b.lifetime) return;
  std::lock_guard<std::mutex> lock(b.lifetime->mutex);
  b.lifetime->produced = std::move(produced);
}

void consumer_wait(const Buffer& b, std::intptr_t consumer) {
  if (!b.lifetime || consumer == -1) return;
  std::shared_ptr<Production> p;
  {
    std::lock_guard<std::mutex> lock(b.lifetime->mutex);
    p = b.lifetime->produced;
  }
  if (!p) return;  // nothing was queued to write it
  DeviceGuard guard(b.ref.device.index);
  GFK_CUDA_TRY(cudaStreamWaitEvent(as_stream(static_cast<std::uintptr_t>(consumer)), p->event, 0));
}

void record_stream(const Buffer& b, std::uintptr_t stream) {
  if (!b.lifetime) return;
  std::lock_guard<std::mutex> lock(b.lifetime->mutex);
  if (stream == b.lifetime->stream) return;
  for (auto s : b.lifetime->uses)
    if (s == stream) return;
  b.lifetime->uses.push_back(stream);
}

KernelMemoryStats kernel_memory_stats(int device) {
  KernelMemoryStats s;
  DeviceMemory* dm = find_memory(device);
  if (!dm) return s;
  s.backend = memory_backend_name(dm->backend);
  s.live_results = dm->live_results.load();
  s.failed_releases = dm->failed_releases.load();
  if (dm->backend == MemoryBackend::AsyncPool) {
    GFK_CUDA_TRY(cudaMemPoolGetAttribute(dm->pool, cudaMemPoolAttrUsedMemCurrent, &s.used_bytes));
    GFK_CUDA_TRY(cudaMemPoolGetAttribute(dm->pool, cudaMemPoolAttrReservedMemCurrent, &s.reserved_bytes));
    GFK_CUDA_TRY(cudaMemPoolGetAttribute(dm->pool, cudaMemPoolAttrReleaseThreshold, &s.release_threshold));
  } else {
    const AllocatorStats a = device_allocator(device).stats();  // shared with gpufleet tensors
    s.used_bytes = a.allocated_bytes;
    s.reserved_bytes = a.reserved_bytes;
  }
  return s;
}

void trim_kernel_memory() {
  std::vector<DeviceMemory*> all;
  {
    std::lock_guard<std::mutex> lock(memory_mutex);
    for (auto& [i, dm] : memories()) all.push_back(dm);
  }
  for (DeviceMemory* dm : all) {
    if (dm->backend != MemoryBackend::AsyncPool) continue;  // the caching backend is the tensors' cache
    DeviceGuard guard(dm->device);
    GFK_CUDA_TRY(cudaMemPoolTrimTo(dm->pool, 0));
  }
}

}  // namespace gpufleet::kernels
