// kmeans1d on CUDA: exact k-means of uint8 values (Note [Exact 1-D k-means]) per image, in three
// launches for the whole batch: a shared-memory histogram, a one-block-per-image dynamic programme
// over the (at most 256) occupied bins, and a table lookup for the labels.
#include <cmath>
#include <cstdint>

#include "kernels/cuda_util.h"
#include "kernels/kernels_cuda.cuh"
#include "kernels/kmeans1d.h"

namespace gpufleet::kernels {

namespace {

constexpr int kHistBlocks = 64;  // blocks per image for the histogram

__global__ void histogram_u8(const std::uint8_t* __restrict__ in, std::int64_t plane,
                             unsigned long long* __restrict__ hist) {
  __shared__ unsigned int local[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const std::int64_t img = blockIdx.y;
  const std::uint8_t* src = in + img * plane;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    atomicAdd(&local[src[i]], 1u);
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[img * 256 + i], static_cast<unsigned long long>(local[i]));
}

// The seed's min-max of the label (float32 arithmetic without contraction, as NumPy).
__device__ inline std::uint8_t normalized_label_d(int l, int top) {
  if (top == 0) return 0;
  const float t = __fmul_rn(__fsub_rn(static_cast<float>(l), 0.f), 255.f);
  return static_cast<std::uint8_t>(__fdiv_rn(t, __fsub_rn(static_cast<float>(top), 0.f)));
}

// One block of 256 threads per image.
__global__ void kmeans_dp_u8(const unsigned long long* __restrict__ hist, int k, double* __restrict__ centres_out,
                             double* __restrict__ inertia_out, std::int32_t* __restrict__ clusters_out,
                             std::int32_t* __restrict__ label_lut, std::uint8_t* __restrict__ norm_lut) {
  __shared__ double x[256], wt[256], W[257], S1[257], S2[257], prev[256], cur[256], c[kMaxCudaK];
  __shared__ std::uint8_t arg[kMaxCudaK][256];
  __shared__ int n, lut[256];
  __shared__ double shift;
  const std::int64_t img = blockIdx.x;
  const unsigned long long* hh = hist + img * 256;
  const int j = threadIdx.x;
  if (j == 0) {
    int cnt = 0;
    double tw = 0, tx = 0;
    for (int v = 0; v < 256; ++v)
      if (hh[v]) {
        x[cnt] = v;
        wt[cnt] = static_cast<double>(hh[v]);
        tw += wt[cnt];
        tx += wt[cnt] * v;
        ++cnt;
      }
    n = cnt;
    shift = tx / tw;
    W[0] = S1[0] = S2[0] = 0;
    for (int i = 0; i < cnt; ++i) {
      const double d = x[i] - shift;
      W[i + 1] = W[i] + wt[i];
      S1[i + 1] = S1[i] + wt[i] * d;
      S2[i + 1] = S2[i] + wt[i] * d * d;
    }
  }
  __syncthreads();
  auto cost = [&](int a, int b) {
    const double ww = W[b + 1] - W[a], s = S1[b + 1] - S1[a];
    const double v = (S2[b + 1] - S2[a]) - s * s / ww;
    return v > 0 ? v : 0.0;
  };
  const int kk = k < n ? k : n;
  if (kk == n) {
    if (j < n) c[j] = x[j];
  } else {
    if (j < n) prev[j] = cost(0, j);
    __syncthreads();
    for (int m = 1; m < kk; ++m) {
      if (j >= m && j < n) {
        double best = INFINITY;
        int bi = m;
        for (int i = m; i <= j; ++i) {
          const double v = prev[i - 1] + cost(i, j);
          if (v < best) {
            best = v;
            bi = i;
          }
        }
        cur[j] = best;
        arg[m][j] = static_cast<std::uint8_t>(bi);
      }
      __syncthreads();
      if (j >= m && j < n) prev[j] = cur[j];
      __syncthreads();
    }
    if (j == 0) {
      int e = n - 1;
      for (int m = kk - 1; m >= 0; --m) {
        const int b = m == 0 ? 0 : arg[m][e];
        c[m] = (S1[e + 1] - S1[b]) / (W[e + 1] - W[b]) + shift;
        e = b - 1;
      }
    }
  }
  __syncthreads();
  // Nearest centre for every byte value, ties to the lower label (as kmeans_label_lut).
  int label = 0;
  while (label + 1 < kk && static_cast<double>(j) > 0.5 * (c[label] + c[label + 1])) ++label;
  lut[j] = label;
  label_lut[img * 256 + j] = label;
  if (norm_lut) norm_lut[img * 256 + j] = normalized_label_d(label, kk - 1);
  if (j < k) centres_out[img * k + j] = j < kk ? c[j] : NAN;
  __syncthreads();
  if (j == 0) {
    double total = 0;
    for (int v = 0; v < 256; ++v) {
      const double d = v - c[lut[v]];
      total += static_cast<double>(hh[v]) * d * d;
    }
    if (inertia_out) inertia_out[img] = total;
    if (clusters_out) clusters_out[img] = kk;
  }
}

__global__ void apply_lut_u8(const std::uint8_t* __restrict__ in, std::int64_t plane, std::int64_t total,
                             const std::int32_t* __restrict__ label_lut, const std::uint8_t* __restrict__ norm_lut,
                             std::int32_t* __restrict__ labels, std::uint8_t* __restrict__ normalized) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t base = (i / plane) * 256 + in[i];
    if (labels) labels[i] = label_lut[base];
    if (normalized) normalized[i] = norm_lut[base];
  }
}

}  // namespace

void launch_kmeans_u8(const std::uint8_t* in, std::int64_t n, std::int64_t plane, int k, std::int32_t* labels,
                      std::uint8_t* normalized, double* centres, double* inertia, std::int32_t* clusters,
                      cudaStream_t stream) {
  GFK_CHECK_ARG(k <= kMaxCudaK, "kmeans1d: k={} is too large for the CUDA backend (at most {}); use a CPU array", k,
               kMaxCudaK);
  GFK_CHECK_ARG(n <= 65535, "kmeans1d: a batch of {} images is too large for one CUDA launch (at most 65535)", n);
  Scratch<unsigned long long> hist(static_cast<std::size_t>(n * 256), stream);
  Scratch<std::int32_t> label_lut(static_cast<std::size_t>(n * 256), stream);
  Scratch<std::uint8_t> norm_lut(normalized ? static_cast<std::size_t>(n * 256) : 0, stream);
  GFK_CUDA_TRY(cudaMemsetAsync(hist.get(), 0, sizeof(unsigned long long) * n * 256, stream));
  const unsigned hb = static_cast<unsigned>(std::min<std::int64_t>(kHistBlocks, (plane + 255) / 256));
  histogram_u8<<<dim3(hb, static_cast<unsigned>(n)), 256, 0, stream>>>(in, plane, hist.get());
  GF_CUDA_CHECK_LAUNCH();
  kmeans_dp_u8<<<static_cast<unsigned>(n), 256, 0, stream>>>(hist.get(), k, centres, inertia, clusters,
                                                             label_lut.get(), norm_lut.get());
  GF_CUDA_CHECK_LAUNCH();
  if (labels || normalized) {
    apply_lut_u8<<<grid_for(n * plane, 256), 256, 0, stream>>>(in, plane, n * plane, label_lut.get(), norm_lut.get(),
                                                               labels, normalized);
    GF_CUDA_CHECK_LAUNCH();
  }
}

void kmeans1d_cuda(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& args, bool per_image) {
  GFK_CHECK_ARG(values.dtype == DType::U8,
               "kmeans1d: the CUDA backend supports uint8 values (exact k-means on the histogram), got a {}; use a "
               "CPU array for float values",
               values.describe());
  GFK_CHECK_ARG(args.method == KMeansMethod::Exact && args.sample == 0,
               "kmeans1d: the CUDA backend supports method='exact' without sampling (it uses every pixel)");
  const std::int64_t problems = per_image && values.ndim() == 3 ? values.shape[0] : 1;
  DeviceGuard guard(values.device.index);
  launch_kmeans_u8(values.ptr<const std::uint8_t>(), problems, values.numel() / problems, args.k,
                   out.labels.ptr<std::int32_t>(), nullptr, out.centres.ptr<double>(), out.inertia.ptr<double>(),
                   out.clusters.ptr<std::int32_t>(), as_stream(values.stream));
}

}  // namespace gpufleet::kernels
