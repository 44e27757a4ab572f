// Device memory and stream helpers for the kernels (CUDA builds only; see array.h).
#include <memory>

#include "common/error.h"
#include "kernels/array.h"
#include "kernels/cuda_util.h"

namespace gpufleet::kernels {

void raise_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  (void)cudaGetLastError();
  throw CudaError(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(status), cudaGetErrorString(status),
                              expr, file, line),
                  static_cast<int>(status));
}

Buffer allocate_cuda(Device device, DType dtype, std::vector<std::int64_t> shape, std::uintptr_t stream) {
  DeviceGuard guard(device.index);
  Buffer b;
  b.ref.dtype = dtype;
  b.ref.shape = std::move(shape);
  b.ref.device = device;
  b.ref.stream = stream;
  const std::size_t bytes = static_cast<std::size_t>(b.ref.numel()) * dtype_size(dtype);
  void* p = nullptr;
  if (bytes) GFK_CUDA_TRY(cudaMallocAsync(&p, bytes, as_stream(stream)));
  const int index = device.index;
  // Freed on the stream it was allocated on, after the work queued there; the stream must outlive it.
  b.storage = std::shared_ptr<void>(p, [index, stream](void* q) {
    if (!q) return;
    int prev = 0;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = index;
    if (index >= 0 && index != prev) (void)cudaSetDevice(index);
    if (cudaFreeAsync(q, as_stream(stream)) != cudaSuccess) (void)cudaGetLastError();
    if (index >= 0 && index != prev) (void)cudaSetDevice(prev);
  });
  b.ref.data = p;
  return b;
}

void stream_wait(Device device, std::uintptr_t producer, std::intptr_t consumer) {
  if (consumer == -1 || static_cast<std::uintptr_t>(consumer) == producer) return;
  DeviceGuard guard(device.index);
  cudaEvent_t ev;
  GFK_CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  cudaError_t e1 = cudaEventRecord(ev, as_stream(producer));
  cudaError_t e2 = e1 == cudaSuccess ? cudaStreamWaitEvent(as_stream(static_cast<std::uintptr_t>(consumer)), ev, 0) : e1;
  (void)cudaEventDestroy(ev);  // safe: destruction is deferred until the wait completes
  GFK_CUDA_TRY(e2);
}

}  // namespace gpufleet::kernels
