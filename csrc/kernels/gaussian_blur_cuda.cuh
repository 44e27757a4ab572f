#pragma once
/// The CUDA blur on raw device pointers, shared with the congestion chain (CUDA builds only).
#include <cuda_runtime_api.h>

#include "kernels/gaussian_blur.h"
#include "kernels/launch_shape.h"

namespace gpufleet::kernels {

/// The largest kernel radius of the CUDA blur (its row pass tiles 4 x (128 + 2r) floats in shared memory).
inline constexpr std::size_t kMaxCudaRadius = 1100;
static_assert(blur_rows_launch(1, 1, kMaxCudaRadius).shared <= kMaxShared);

/// Throws ValueError when the plan's kernel is beyond kMaxCudaRadius (before anything is queued).
void check_blur_cuda(const BlurPlan& plan);

void gaussian_blur_cuda_raw(const void* in, void* out, DType dtype, std::int64_t n, std::int64_t h, std::int64_t w,
                            const BlurPlan& plan, cudaStream_t stream);

}  // namespace gpufleet::kernels
