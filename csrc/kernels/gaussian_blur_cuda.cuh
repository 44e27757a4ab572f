#pragma once
/// The CUDA blur on raw device pointers, shared with the congestion chain (CUDA builds only).
#include <cuda_runtime_api.h>

#include "kernels/gaussian_blur.h"

namespace gpufleet::kernels {

/// The largest kernel radius the CUDA row pass tiles in 48 KiB of shared memory.
inline constexpr std::size_t kMaxCudaRadius = 1100;

void gaussian_blur_cuda_raw(const void* in, void* out, DType dtype, std::int64_t n, std::int64_t h, std::int64_t w,
                            const BlurPlan& plan, cudaStream_t stream);

}  // namespace gpufleet::kernels
