// kmeans1d on CUDA: exact k-means of uint8 values (Note [Exact 1-D k-means]) per image, in three
// launches for the whole batch (any size: Note [Grid-stride launches]): a shared-memory histogram, a
// one-block-per-image dynamic programme over the (at most 256) occupied bins, and a table lookup for
// the labels.
//
// Note [Bit-exact k-means on CUDA]: the labels, centres and inertia equal the CPU path's bit for bit,
// so the dynamic programme repeats the CPU's arithmetic exactly: the same prefix sums, the same
// segment cost, the same divide and conquer over the splits (run level by level, one range per
// thread: a range's result depends only on its bounds, so the order of evaluation does not matter)
// and the same first-minimum rule. This file is compiled with -fmad=false (csrc/CMakeLists.txt): nvcc
// otherwise fuses w*d*d into the prefix sums and the inertia as FMAs, whose single rounding differs
// from the CPU's two, and near ties then flip a split, hence labels.
#include <cmath>
#include <cstdint>

#include "kernels/cuda_util.h"
#include "kernels/kernels_cuda.cuh"
#include "kernels/kmeans1d.h"

namespace gpufleet::kernels {

namespace {

constexpr int kDpThreads = 256;

// Per (image, block) a shared-memory histogram of the block's share, added to the image's.
__global__ void histogram_u8(const std::uint8_t* __restrict__ in, std::int64_t n, std::int64_t plane,
                             unsigned long long* __restrict__ hist) {
  __shared__ unsigned int local[256];
  for (std::int64_t img = blockIdx.y; img < n; img += gridDim.y) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) local[i] = 0;
    __syncthreads();
    const std::uint8_t* src = in + img * plane;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
      atomicAdd(&local[src[i]], 1u);
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
      if (local[i]) atomicAdd(&hist[img * 256 + i], static_cast<unsigned long long>(local[i]));
    __syncthreads();  // local is cleared for the next image
  }
}

// The seed's min-max of the label (float32 arithmetic without contraction, as NumPy).
__device__ inline std::uint8_t normalized_label_d(int l, int top) {
  if (top == 0) return 0;
  const float t = __fmul_rn(__fsub_rn(static_cast<float>(l), 0.f), 255.f);
  return static_cast<std::uint8_t>(__fdiv_rn(t, __fsub_rn(static_cast<float>(top), 0.f)));
}

// A range of exact_centres' divide and conquer (kmeans1d_cpu.cpp): the outputs j in [jlo, jhi], their
// argmin searched in [ilo, ihi]; empty when jlo > jhi. Values are bin positions (< 256).
struct DcRange {
  short jlo, jhi, ilo, ihi;
};
constexpr int kDcSlots = 512;  // 2^9: the children of the deepest level's 256 ranges

// One block of 256 threads per image at a time (blocks step over images).
__global__ void __launch_bounds__(kDpThreads)
    kmeans_dp_u8(const unsigned long long* __restrict__ hist, std::int64_t images, int k,
                 double* __restrict__ centres_out, double* __restrict__ inertia_out,
                 std::int32_t* __restrict__ clusters_out, std::int32_t* __restrict__ label_lut,
                 std::uint8_t* __restrict__ norm_lut) {
  __shared__ double x[256], wt[256], W[257], S1[257], S2[257], prev[256], cur[256], c[kMaxCudaK];
  __shared__ std::uint8_t arg[kMaxCudaK][256];
  __shared__ DcRange ranges[2][kDcSlots];
  __shared__ int n, lut[256];
  __shared__ double shift;
  const int j = threadIdx.x;
  for (std::int64_t img = blockIdx.x; img < images; img += gridDim.x) {
    const unsigned long long* hh = hist + img * 256;
    if (j == 0) {  // Prefix in kmeans1d_cpu.cpp, operation for operation
      int cnt = 0;
      double tw = 0, tx = 0;
      for (int v = 0; v < 256; ++v)
        if (hh[v]) {
          x[cnt] = v;
          wt[cnt] = static_cast<double>(hh[v]);
          tw += wt[cnt];
          tx += wt[cnt] * x[cnt];
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
    auto cost = [&](int a, int b) {  // Prefix::cost
      const double ww = W[b + 1] - W[a], s = S1[b + 1] - S1[a];
      const double v = (S2[b + 1] - S2[a]) - s * s / ww;
      return v > 0 ? v : 0.0;
    };
    const int cnt = n;
    const int kk = k < cnt ? k : cnt;
    if (kk == cnt) {
      if (j < cnt) c[j] = x[j];
    } else {
      if (j < cnt) prev[j] = cost(0, j);
      __syncthreads();
      for (int m = 1; m < kk; ++m) {
        if (j == 0) ranges[0][0] = {static_cast<short>(m), static_cast<short>(cnt - 1), static_cast<short>(m),
                                    static_cast<short>(cnt - 1)};
        __syncthreads();
        // Levels 0..8 of the recursion (ranges of at most 255 outputs halve each level).
        int src = 0;
        for (int slots = 1; slots <= 256; slots *= 2) {
          for (int t = j; t < slots; t += blockDim.x) {
            const DcRange r = ranges[src][t];
            DcRange left{1, 0, 0, 0}, right{1, 0, 0, 0};
            if (r.jlo <= r.jhi) {
              const int jm = r.jlo + (r.jhi - r.jlo) / 2;
              const int lo = r.ilo > m ? r.ilo : m, hi = r.ihi < jm ? r.ihi : jm;
              double best = INFINITY;
              int bi = lo;
              for (int i = lo; i <= hi; ++i) {
                const double v = prev[i - 1] + cost(i, jm);
                if (v < best) {
                  best = v;
                  bi = i;
                }
              }
              cur[jm] = best;
              arg[m][jm] = static_cast<std::uint8_t>(bi);
              if (jm > r.jlo) left = {r.jlo, static_cast<short>(jm - 1), r.ilo, static_cast<short>(bi)};
              if (jm < r.jhi) right = {static_cast<short>(jm + 1), r.jhi, static_cast<short>(bi), r.ihi};
            }
            ranges[src ^ 1][2 * t] = left;
            ranges[src ^ 1][2 * t + 1] = right;
          }
          src ^= 1;
          __syncthreads();
        }
        if (j >= m && j < cnt) prev[j] = cur[j];
        __syncthreads();
      }
      if (j == 0) {
        int e = cnt - 1;
        for (int m = kk - 1; m >= 0; --m) {
          const int b = m == 0 ? 0 : arg[m][e];
          c[m] = (S1[e + 1] - S1[b]) / (W[e + 1] - W[b]) + shift;  // Prefix::mean
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
      double total = 0;  // kmeans1d_cpu_one: hist[v] * sq[v], v ascending
      for (int v = 0; v < 256; ++v) {
        const double d = v - c[lut[v]];
        total += static_cast<double>(hh[v]) * (d * d);
      }
      if (inertia_out) inertia_out[img] = total;
      if (clusters_out) clusters_out[img] = kk;
    }
    __syncthreads();  // shared memory is reused for the next image
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

void check_kmeans_cuda(int k) {
  GFK_CHECK_ARG(k <= kMaxCudaK, "kmeans1d: k={} is too large for the CUDA backend (at most {}); use a CPU array", k,
                kMaxCudaK);
}

void launch_kmeans_u8(const std::uint8_t* in, std::int64_t n, std::int64_t plane, int k, std::int32_t* labels,
                      std::uint8_t* normalized, double* centres, double* inertia, std::int32_t* clusters,
                      cudaStream_t stream) {
  check_kmeans_cuda(k);
  Scratch<unsigned long long> hist(static_cast<std::size_t>(n * 256), stream);
  Scratch<std::int32_t> label_lut(static_cast<std::size_t>(n * 256), stream);
  Scratch<std::uint8_t> norm_lut(normalized ? static_cast<std::size_t>(n * 256) : 0, stream);
  GFK_CUDA_TRY(cudaMemsetAsync(hist.get(), 0, sizeof(unsigned long long) * n * 256, stream));
  const Launch hl = per_group_launch(n, plane);
  histogram_u8<<<as_dim3(hl.grid), as_dim3(hl.block), 0, stream>>>(in, n, plane, hist.get());
  GF_CUDA_CHECK_LAUNCH();
  kmeans_dp_u8<<<grid_dim(n, kMaxGridX), kDpThreads, 0, stream>>>(hist.get(), n, k, centres, inertia, clusters,
                                                                   label_lut.get(), norm_lut.get());
  GF_CUDA_CHECK_LAUNCH();
  if (labels || normalized) {
    const Launch fl = flat_launch(n * plane);
    apply_lut_u8<<<as_dim3(fl.grid), as_dim3(fl.block), 0, stream>>>(in, plane, n * plane, label_lut.get(),
                                                                     norm_lut.get(), labels, normalized);
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
