#pragma once
/// Raw-pointer launchers shared by the CUDA backends and the fused congestion chain (CUDA builds
/// only). Everything is queued on `stream`; nothing synchronises the host.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/canny.h"

namespace gpufleet::kernels {

/// The largest k the CUDA k-means supports (its dynamic programme keeps k x 256 argmins in shared memory).
inline constexpr int kMaxCudaK = 32;

/// Throws ValueError for images canny's CUDA backend cannot take (more than 2^31 - 1 pixels).
void check_canny_cuda(std::int64_t h, std::int64_t w);

/// Canny of n h x w uint8 images: `state` (n*h*w int32 scratch) ends as 2 for edges; `out` (optional)
/// receives 0/255.
void launch_canny(const std::uint8_t* in, std::uint8_t* out, std::int32_t* state, std::int64_t n, std::int64_t h,
                  std::int64_t w, const CannyThresholds& t, bool l2, cudaStream_t stream);

/// Throws ValueError for k beyond kMaxCudaK.
void check_kmeans_cuda(int k);

/// Exact k-means of each of n images of `plane` uint8 values on the 256-bin histogram. Outputs
/// (each optional except centres): labels int32, normalized uint8 (the seed's min-max of the labels),
/// centres (n, k) float64, inertia (n) float64, clusters (n) int32.
void launch_kmeans_u8(const std::uint8_t* in, std::int64_t n, std::int64_t plane, int k, std::int32_t* labels,
                      std::uint8_t* normalized, double* centres, double* inertia, std::int32_t* clusters,
                      cudaStream_t stream);

/// out[g] = mean of the g-th block of `len` float32 values, accumulated in double.
void launch_mean_f32(const float* in, double* out, std::int64_t groups, std::int64_t len, cudaStream_t stream);

#ifdef __CUDACC__
/// The sum of `v` over the block (blockDim.x a power of two, `s` a shared array of blockDim.x), in a
/// fixed order (deterministic); valid in thread 0. Every thread of the block must call it; `s` may be
/// reused once it returns.
__device__ inline double block_sum(double v, double* s) {
  s[threadIdx.x] = v;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
    __syncthreads();
  }
  const double total = s[0];
  __syncthreads();
  return total;
}
#endif

}  // namespace gpufleet::kernels
