// CUDA slot: device checks, raw allocations, streams and events (Note [Source conventions]).
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <mutex>

#include "common/cuda_check.h"
#include "common/cuda_device_scope.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"
#include "tensor/tensor.h"

namespace gpufleet::cuda_backend {

namespace {
using DeviceScope = CudaDeviceScope;
inline cudaStream_t as_stream(std::uintptr_t h) { return as_cuda_stream(h); }
inline cudaEvent_t as_event(std::uintptr_t h) { return reinterpret_cast<cudaEvent_t>(h); }
}  // namespace

int runtime_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

void check_device(int index, const char* what) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(fmt::format("no CUDA device is available: {} ({}: {})", what, cudaGetErrorName(e),
                                         cudaGetErrorString(e)));
  }
  if (n == 0) {
    const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
    throw std::runtime_error(fmt::format("no CUDA device is available: {} (the CUDA runtime sees 0 devices; "
                                         "CUDA_VISIBLE_DEVICES={})",
                                         what, vis ? fmt::format("'{}'", vis) : "unset"));
  }
  if (index >= n)
    throw std::invalid_argument(fmt::format("{}: CUDA device index {} is out of range: {} device{} visible (cuda:0 "
                                            "to cuda:{})",
                                            what, index, n, n == 1 ? " is" : "s are", n - 1));
}

void* raw_device_alloc(int device, std::size_t nbytes) {
  DeviceScope scope(device);
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, nbytes);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  GF_CUDA_TRY(e);
  return p;
}

namespace {
std::mutex injected_mutex;
int injected_after = 0, injected_failures = 0;

// Test hook (gpufleet._core._inject_cuda_free_failures): true when this free is to fail as a cudaFree
// on a broken context would (tests/python/test_cuda_lifetimes.py).
bool injected_free_failure() {
  std::lock_guard<std::mutex> lock(injected_mutex);
  if (injected_failures == 0) return false;
  if (injected_after > 0) {
    --injected_after;
    return false;
  }
  --injected_failures;
  return true;
}
}  // namespace

void inject_device_free_failures(int count, int after) {
  std::lock_guard<std::mutex> lock(injected_mutex);
  injected_failures = count;
  injected_after = after;
}

void raw_device_free(int device, void* ptr) {
  if (injected_free_failure())
    throw CudaError(fmt::format("CUDA error cudaErrorLaunchFailure in cudaFree({}) (injected by "
                                "gpufleet._core._inject_cuda_free_failures; the block is not freed)",
                                ptr),
                    static_cast<int>(cudaErrorLaunchFailure));
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaFree(ptr));
}

void* raw_pinned_alloc(std::size_t nbytes) {
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, nbytes, cudaHostAllocPortable);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  GF_CUDA_TRY(e);
  return p;
}

void raw_pinned_free(void* ptr) { GF_CUDA_TRY(cudaFreeHost(ptr)); }

void memset_zero(const Tensor& dst) {
  const int dev = dst.device().index;
  DeviceScope scope(dev);
  GF_CUDA_TRY(cudaMemsetAsync(dst.data_ptr(), 0, dst.nbytes(), as_stream(current_stream(dev).handle())));
}

std::uintptr_t stream_create(int device, int priority) {
  DeviceScope scope(device);
  cudaStream_t s = nullptr;
  GF_CUDA_TRY(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority));
  return reinterpret_cast<std::uintptr_t>(s);
}

void stream_destroy(int device, std::uintptr_t stream) {
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaStreamDestroy(as_stream(stream)));
}

void stream_synchronize(int device, std::uintptr_t stream) {
  check_device(device, "cannot synchronize a stream");
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaStreamSynchronize(as_stream(stream)));
}

bool stream_query(int device, std::uintptr_t stream) {
  check_device(device, "cannot query a stream");
  DeviceScope scope(device);
  const cudaError_t e = cudaStreamQuery(as_stream(stream));
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  GF_CUDA_TRY(e);
  return true;
}

void stream_wait_event(int device, std::uintptr_t stream, std::uintptr_t event) {
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0));
}

std::uintptr_t event_create(int device, bool enable_timing) {
  check_device(device, "cannot create a CUDA event");
  DeviceScope scope(device);
  cudaEvent_t e = nullptr;
  GF_CUDA_TRY(cudaEventCreateWithFlags(&e, enable_timing ? cudaEventDefault : cudaEventDisableTiming));
  return reinterpret_cast<std::uintptr_t>(e);
}

void event_destroy(int device, std::uintptr_t event) {
  if (device < 0) {  // cudaEventDestroy needs no particular current device
    GF_CUDA_TRY(cudaEventDestroy(as_event(event)));
    return;
  }
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaEventDestroy(as_event(event)));
}

void event_record(int device, std::uintptr_t event, std::uintptr_t stream) {
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaEventRecord(as_event(event), as_stream(stream)));
}

void event_synchronize(std::uintptr_t event) { GF_CUDA_TRY(cudaEventSynchronize(as_event(event))); }

bool event_query(std::uintptr_t event) {
  const cudaError_t e = cudaEventQuery(as_event(event));
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  GF_CUDA_TRY(e);
  return true;
}

float event_elapsed_ms(std::uintptr_t start, std::uintptr_t end) {
  float ms = 0;
  GF_CUDA_TRY(cudaEventElapsedTime(&ms, as_event(start), as_event(end)));
  return ms;
}

void device_synchronize(int device) {
  DeviceScope scope(device);
  GF_CUDA_TRY(cudaDeviceSynchronize());
}

void stream_wait_stream(int device, std::uintptr_t consumer_stream, std::uintptr_t producer_stream) {
  if (consumer_stream == producer_stream) return;
  DeviceScope scope(device);
  cudaEvent_t e = nullptr;
  GF_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  const cudaError_t r1 = cudaEventRecord(e, as_stream(producer_stream));
  const cudaError_t r2 = r1 == cudaSuccess ? cudaStreamWaitEvent(as_stream(consumer_stream), e, 0) : r1;
  (void)cudaEventDestroy(e);  // destroying a recorded event is fine: waits already queued keep it
  GF_CUDA_TRY(r2);
}

}  // namespace gpufleet::cuda_backend
