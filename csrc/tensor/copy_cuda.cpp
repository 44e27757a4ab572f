// CUDA slot: host<->device and device<->device copies (Note [non_blocking] in tensor.cpp).
#include <cuda_runtime_api.h>

#include <mutex>
#include <set>
#include <utility>

#include "common/cuda_check.h"
#include "common/cuda_device_scope.h"
#include "tensor/copy_kernels.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"
#include "tensor/tensor.h"

namespace gpufleet::cuda_backend {

namespace {
using DeviceScope = CudaDeviceScope;

inline cudaStream_t as_stream(std::uintptr_t h) { return as_cuda_stream(h); }

/// A copy in flight, as the host side's pending work (Note [Host reads wait for copies]).
class EventWork final : public PendingWork {
 public:
  explicit EventWork(Stream stream) : event_(false) { event_.record(stream); }
  void wait() override { event_.synchronize(); }

 private:
  Event event_;
};

void finish_host_copy(const Tensor& host, const Stream& stream, bool non_blocking) {
  if (!non_blocking) {
    stream.synchronize();
  } else if (host.is_pinned()) {
    host.storage()->set_pending(std::make_shared<EventWork>(stream));
  }
  // non_blocking with pageable memory: cudaMemcpyAsync itself returned only once the host buffer
  // was read (host->device, staged) or written (device->host), so the host side is already safe.
}

/// Enables peer access from `dst` to `src` once, when the hardware allows it; cudaMemcpyPeerAsync
/// stages through the host otherwise.
void maybe_enable_peer(int dst, int src) {
  static std::mutex mutex;
  static std::set<std::pair<int, int>> done;
  std::lock_guard<std::mutex> lock(mutex);
  if (!done.insert({dst, src}).second) return;
  int can = 0;
  if (cudaDeviceCanAccessPeer(&can, dst, src) != cudaSuccess || !can) {
    (void)cudaGetLastError();
    return;
  }
  DeviceScope scope(dst);
  const cudaError_t e = cudaDeviceEnablePeerAccess(src, 0);
  if (e != cudaSuccess) (void)cudaGetLastError();  // already enabled, or not possible: the copy still works
}

void host_to_device(const Tensor& dst, const Tensor& src, bool non_blocking) {
  const int dev = dst.device().index;
  check_device(dev, fmt::format("cannot copy to {}", dst.device().str()).c_str());
  src.storage()->wait_pending();
  const Tensor hsrc = src.contiguous();
  DeviceScope scope(dev);
  const Stream stream = current_stream(dev);
  if (dst.is_contiguous() && dst.dtype() == src.dtype()) {
    GF_CUDA_TRY(cudaMemcpyAsync(dst.data_ptr(), hsrc.data_ptr(), dst.nbytes(), cudaMemcpyHostToDevice,
                                as_stream(stream.handle())));
  } else {
    const Tensor tmp = Tensor::empty(src.shape(), src.dtype(), dst.device());
    GF_CUDA_TRY(cudaMemcpyAsync(tmp.data_ptr(), hsrc.data_ptr(), tmp.nbytes(), cudaMemcpyHostToDevice,
                                as_stream(stream.handle())));
    launch_strided_copy(dst, tmp, stream.handle());
  }
  finish_host_copy(hsrc, stream, non_blocking);
}

void device_to_host(const Tensor& dst, const Tensor& src, bool non_blocking) {
  const int dev = src.device().index;
  check_device(dev, fmt::format("cannot copy from {}", src.device().str()).c_str());
  dst.storage()->wait_pending();
  DeviceScope scope(dev);
  const Stream stream = current_stream(dev);
  Tensor dsrc = src;
  if (!(src.is_contiguous() && src.dtype() == dst.dtype())) {
    dsrc = Tensor::empty(src.shape(), dst.dtype(), src.device());
    launch_strided_copy(dsrc, src, stream.handle());
  }
  if (dst.is_contiguous()) {
    GF_CUDA_TRY(cudaMemcpyAsync(dst.data_ptr(), dsrc.data_ptr(), dst.nbytes(), cudaMemcpyDeviceToHost,
                                as_stream(stream.handle())));
    finish_host_copy(dst, stream, non_blocking);
  } else {
    const Tensor tmp = Tensor::empty(dst.shape(), dst.dtype(), Device::cpu());
    GF_CUDA_TRY(cudaMemcpyAsync(tmp.data_ptr(), dsrc.data_ptr(), tmp.nbytes(), cudaMemcpyDeviceToHost,
                                as_stream(stream.handle())));
    stream.synchronize();
    detail::cpu_copy(dst, tmp);
  }
}

void device_to_device(const Tensor& dst, const Tensor& src) {
  const int sdev = src.device().index, ddev = dst.device().index;
  check_device(std::max(sdev, ddev), fmt::format("cannot copy from {} to {}", src.device().str(), dst.device().str()).c_str());
  if (sdev == ddev) {
    DeviceScope scope(ddev);
    const Stream stream = current_stream(ddev);
    if (dst.is_contiguous() && src.is_contiguous() && dst.dtype() == src.dtype()) {
      GF_CUDA_TRY(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), dst.nbytes(), cudaMemcpyDeviceToDevice,
                                  as_stream(stream.handle())));
    } else {
      launch_strided_copy(dst, src, stream.handle());
    }
    return;
  }
  // Across devices: convert/compact on the source device, copy peer-to-peer (staged through the host
  // by the runtime when the GPUs cannot reach each other), scatter into place on the destination.
  const Stream sstream = current_stream(sdev), dstream = current_stream(ddev);
  Tensor ssrc = src;
  if (!(src.is_contiguous() && src.dtype() == dst.dtype())) {
    DeviceScope scope(sdev);
    ssrc = Tensor::empty(src.shape(), dst.dtype(), src.device());
    launch_strided_copy(ssrc, src, sstream.handle());
  }
  const Tensor dtgt = dst.is_contiguous() ? dst : Tensor::empty(dst.shape(), dst.dtype(), dst.device());
  maybe_enable_peer(ddev, sdev);
  dstream.wait_stream(sstream);
  {
    DeviceScope scope(ddev);
    GF_CUDA_TRY(cudaMemcpyPeerAsync(dtgt.data_ptr(), ddev, ssrc.data_ptr(), sdev, dtgt.nbytes(),
                                    as_stream(dstream.handle())));
    if (!dtgt.shares_storage_with(dst)) launch_strided_copy(dst, dtgt, dstream.handle());
  }
  // Later work on the source stream (reusing ssrc's block, writing src) waits for the copy.
  sstream.wait_stream(dstream);
}
}  // namespace

void launch_strided_copy(const Tensor& dst, const Tensor& src, std::uintptr_t stream) {
  GF_ASSERT(dst.shape() == src.shape() && dst.device() == src.device(), "launch_strided_copy operands");
  const std::int64_t n = dst.numel();
  if (n == 0) return;
  // Drop size-1 dimensions and merge dimensions compact for both operands (index 0 innermost).
  CopyGeometry g;
  const auto& shape = dst.shape();
  for (int i = dst.ndim() - 1; i >= 0; --i) {
    if (shape[i] == 1) continue;
    const std::int64_t ds = dst.strides()[i], ss = src.strides()[i];
    if (g.ndim > 0 && g.dst_strides[g.ndim - 1] * g.sizes[g.ndim - 1] == ds &&
        g.src_strides[g.ndim - 1] * g.sizes[g.ndim - 1] == ss) {
      g.sizes[g.ndim - 1] *= shape[i];
      continue;
    }
    GF_CHECK_ARG(g.ndim < kMaxCopyDims, "CUDA strided copies support at most {} non-mergeable dimensions (shape {})",
                 kMaxCopyDims, shape_str(shape));
    g.sizes[g.ndim] = shape[i];
    g.dst_strides[g.ndim] = ds;
    g.src_strides[g.ndim] = ss;
    g.ndim++;
  }
  if (g.ndim == 0) {
    g.ndim = 1;
    g.sizes[0] = 1;
  }
  DeviceScope scope(dst.device().index);
  GF_CUDA_TRY(static_cast<cudaError_t>(launch_strided_copy_kernel(dst.data_ptr(), dst.dtype(), src.data_ptr(),
                                                                  src.dtype(), g, n,
                                                                  reinterpret_cast<void*>(stream))));
}

void copy(const Tensor& dst, const Tensor& src, bool non_blocking) {
  const bool dcuda = dst.device().is_cuda(), scuda = src.device().is_cuda();
  if (dcuda && scuda) device_to_device(dst, src);
  else if (dcuda) host_to_device(dst, src, non_blocking);
  else device_to_host(dst, src, non_blocking);
}

}  // namespace gpufleet::cuda_backend
