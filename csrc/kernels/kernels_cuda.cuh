#pragma once
/// Raw-pointer launchers shared by the CUDA backends and the fused congestion chain (CUDA builds
/// only). Everything is queued on `stream`; nothing synchronises the host.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/canny.h"

namespace gpufleet::kernels {

/// The largest k the CUDA k-means supports (its dynamic programme keeps k x 256 argmins in shared memory).
inline constexpr int kMaxCudaK = 32;

/// Canny of n h x w uint8 images: `state` (n*h*w int32 scratch) ends as 2 for edges; `out` (optional)
/// receives 0/255.
void launch_canny(const std::uint8_t* in, std::uint8_t* out, std::int32_t* state, std::int64_t n, std::int64_t h,
                  std::int64_t w, const CannyThresholds& t, bool l2, cudaStream_t stream);

/// Exact k-means of each of n images of `plane` uint8 values on the 256-bin histogram. Outputs
/// (each optional except centres): labels int32, normalized uint8 (the seed's min-max of the labels),
/// centres (n, k) float64, inertia (n) float64, clusters (n) int32.
void launch_kmeans_u8(const std::uint8_t* in, std::int64_t n, std::int64_t plane, int k, std::int32_t* labels,
                      std::uint8_t* normalized, double* centres, double* inertia, std::int32_t* clusters,
                      cudaStream_t stream);

/// out[g] = mean of the g-th block of `len` float32 values, accumulated in double.
void launch_mean_f32(const float* in, double* out, std::int64_t groups, std::int64_t len, cudaStream_t stream);

}  // namespace gpufleet::kernels
