#pragma once
/// CUDA host helpers shared by host files compiled with CUDA (`*_cuda.cpp`): an RAII guard that
/// makes a device current and restores the previous one (rmm's cuda_set_device_raii), and the
/// conversion of gpufleet's opaque stream handles. Not for `.cu` files, which cannot include fmt
/// (see Note [No fmt in .cu files] in csrc/kernels/cuda_util.h, which has its own guard).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_check.h"

namespace gpufleet {

/// Makes `device` current for the scope and restores the previous device.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int device) {
    GF_CUDA_TRY(cudaGetDevice(&previous_));
    if (previous_ != device) GF_CUDA_TRY(cudaSetDevice(device));
    else previous_ = -1;
  }
  ~CudaDeviceScope() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = -1;
};

/// gpufleet passes streams across its API as integers (the DLPack convention); this is the cast back.
inline cudaStream_t as_cuda_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace gpufleet
