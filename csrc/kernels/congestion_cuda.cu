// congestion_score on CUDA for a whole batch (any size: Note [Grid-stride launches]), on the caller's
// stream, without host synchronisation: exact k-means on each image's histogram -> normalised label
// image (one table lookup) -> canny -> fast: a weighted count of the edges (Note [Fast congestion
// score]); faithful: blur + mean. Every limit of the steps is checked before the first is queued.
#include <cstdint>
#include <vector>

#include "kernels/canny.h"
#include "kernels/congestion.h"
#include "kernels/cuda_util.h"
#include "kernels/gaussian_blur.h"
#include "kernels/gaussian_blur_cuda.cuh"
#include "kernels/kernels_cuda.cuh"

namespace gpufleet::kernels {

namespace {

constexpr int kThreads = kReduceThreads;

// Per (image, block): sum over edge pixels of wy[y] * wx[x]; also writes 0/255 edges when asked.
__global__ void edge_weight_partial(const std::int32_t* __restrict__ state, std::int64_t n, std::int64_t h,
                                    std::int64_t w, const double* __restrict__ wy, const double* __restrict__ wx,
                                    std::uint8_t* __restrict__ edges, double* __restrict__ part) {
  __shared__ double s[kThreads];
  const std::int64_t plane = h * w;
  for (std::int64_t img = blockIdx.y; img < n; img += gridDim.y) {
    double acc = 0;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const bool edge = state[img * plane + i] == 2;
      if (edge) acc += wy[i / w] * wx[i % w];
      if (edges) edges[img * plane + i] = edge ? 255 : 0;
    }
    const double total = block_sum(acc, s);
    if (threadIdx.x == 0) part[img * gridDim.x + blockIdx.x] = total;
  }
}

// One thread per image.
__global__ void edge_weight_final(const double* __restrict__ part, int parts, std::int64_t n, double scale,
                                  double* __restrict__ scores) {
  for (std::int64_t img = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; img < n;
       img += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int p = 0; p < parts; ++p) s += part[img * parts + p];
    scores[img] = 255.0 * s * scale;
  }
}

__global__ void edges_to_float(const std::int32_t* __restrict__ state, float* __restrict__ e,
                               std::uint8_t* __restrict__ edges, std::int64_t total) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const bool edge = state[i] == 2;
    e[i] = edge ? 255.f : 0.f;
    if (edges) edges[i] = edge ? 255 : 0;
  }
}

}  // namespace

void congestion_score_cuda(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& a) {
  GFK_CHECK_ARG(depth.dtype == DType::U8,
               "congestion_score: the CUDA backend takes uint8 depth images (exact k-means on the histogram), got a "
               "{}; convert the depth to uint8 as the seed does, or use a CPU array",
               depth.describe());
  const Batch b = as_batch(depth, "congestion_score(depth)");
  BlurArgs blur;
  blur.ksize_x = blur.ksize_y = a.ksize;
  blur.sigma = a.sigma;
  const BlurPlan plan = plan_gaussian_blur(blur, DType::F32, b.h, b.w);
  // Every step's limits before the first step is queued (a failure must not leave half a chain).
  check_kmeans_cuda(a.k);
  check_canny_cuda(b.h, b.w);
  if (!a.fast) check_blur_cuda(plan);
  DeviceGuard guard(depth.device.index);
  const cudaStream_t stream = as_stream(depth.stream);
  const std::int64_t plane = b.plane(), total = b.n * plane;

  // 1. k-means and the normalised label image.
  Scratch<std::uint8_t> norm_tmp(out.normalized.data ? 0 : static_cast<std::size_t>(total), stream);
  Scratch<double> centres_tmp(out.centres.data ? 0 : static_cast<std::size_t>(b.n * a.k), stream);
  std::uint8_t* norm = out.normalized.data ? out.normalized.ptr<std::uint8_t>() : norm_tmp.get();
  double* centres = out.centres.data ? out.centres.ptr<double>() : centres_tmp.get();
  launch_kmeans_u8(depth.ptr<const std::uint8_t>(), b.n, plane, a.k,
                   out.labels.data ? out.labels.ptr<std::int32_t>() : nullptr, norm, centres, nullptr, nullptr, stream);

  // 2. canny into the state map (2 = edge).
  Scratch<std::int32_t> state(static_cast<std::size_t>(total), stream);
  launch_canny(norm, nullptr, state.get(), b.n, b.h, b.w, canny_thresholds({a.low, a.high, false}), false, stream);

  // 3. the score.
  std::uint8_t* edges = out.edges.data ? out.edges.ptr<std::uint8_t>() : nullptr;
  if (a.fast) {
    const std::vector<double> wy = blur_adjoint_weights(plan.ky, b.h, plan.border);
    const std::vector<double> wx = blur_adjoint_weights(plan.kx, b.w, plan.border);
    std::vector<double> weights_host(wy);
    weights_host.insert(weights_host.end(), wx.begin(), wx.end());
    Scratch<double> weights(weights_host.size(), stream);
    upload_async(weights.get(), weights_host.data(), sizeof(double) * weights_host.size(), stream);
    const Launch l = per_group_launch(b.n, plane);
    Scratch<double> part(static_cast<std::size_t>(b.n) * l.grid.x, stream);
    edge_weight_partial<<<as_dim3(l.grid), as_dim3(l.block), 0, stream>>>(state.get(), b.n, b.h, b.w, weights.get(),
                                                                          weights.get() + b.h, edges, part.get());
    GF_CUDA_CHECK_LAUNCH();
    const Launch f = flat_launch(b.n, 128);
    edge_weight_final<<<as_dim3(f.grid), as_dim3(f.block), 0, stream>>>(
        part.get(), static_cast<int>(l.grid.x), b.n, 1.0 / static_cast<double>(plane), out.scores.ptr<double>());
    GF_CUDA_CHECK_LAUNCH();
  } else {
    Scratch<float> e(static_cast<std::size_t>(total), stream);
    Scratch<float> blurred_tmp(out.blurred.data ? 0 : static_cast<std::size_t>(total), stream);
    float* blurred = out.blurred.data ? out.blurred.ptr<float>() : blurred_tmp.get();
    const Launch fl = flat_launch(total, kThreads);
    edges_to_float<<<as_dim3(fl.grid), as_dim3(fl.block), 0, stream>>>(state.get(), e.get(), edges, total);
    GF_CUDA_CHECK_LAUNCH();
    gaussian_blur_cuda_raw(e.get(), blurred, DType::F32, b.n, b.h, b.w, plan, stream);
    launch_mean_f32(blurred, out.scores.ptr<double>(), b.n, plane, stream);
  }
}

}  // namespace gpufleet::kernels
