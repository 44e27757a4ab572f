// normalize_minmax and mean on CUDA: per-(group, block) partial results, then a pass that combines
// them; two launches per operation for the whole batch, deterministic (no floating-point atomics).
// Groups beyond the grid's 65,535 rows are covered by grid-stride loops (Note [Grid-stride launches]).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda_util.h"
#include "kernels/kernels_cuda.cuh"
#include "kernels/reduce.h"

namespace gpufleet::kernels {

namespace {

constexpr int kThreads = kReduceThreads;
constexpr unsigned long long kNoNaN = ~0ull;

// Per (group, block): min and max of the block's share of the group, as float32 (the seed casts to
// float32 first). ±infinity start values, as the CPU: a group of +inf (or of float64 values beyond
// float32's range) has min = max = +inf. With kCheckNaN, the smallest flat index of a NaN goes to
// *nan_at (fminf/fmaxf would skip NaN silently; the CPU path raises).
template <class T, bool kCheckNaN>
__global__ void minmax_partial(const T* __restrict__ in, std::int64_t groups, std::int64_t len,
                               float* __restrict__ lo, float* __restrict__ hi, unsigned long long* __restrict__ nan_at) {
  __shared__ float slo[kThreads], shi[kThreads];
  for (std::int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const T* src = in + g * len;
    float mn = INFINITY, mx = -INFINITY;
    unsigned long long first_nan = kNoNaN;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const float v = static_cast<float>(src[i]);
      if (kCheckNaN && v != v && first_nan == kNoNaN) first_nan = static_cast<unsigned long long>(g * len + i);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    if (kCheckNaN && first_nan != kNoNaN) atomicMin(nan_at, first_nan);  // each thread's first is its smallest
    slo[threadIdx.x] = mn;
    shi[threadIdx.x] = mx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        slo[threadIdx.x] = fminf(slo[threadIdx.x], slo[threadIdx.x + s]);
        shi[threadIdx.x] = fmaxf(shi[threadIdx.x], shi[threadIdx.x + s]);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      lo[g * gridDim.x + blockIdx.x] = slo[0];
      hi[g * gridDim.x + blockIdx.x] = shi[0];
    }
    __syncthreads();  // slo/shi are rewritten for the next group
  }
}

template <class T, class O>
__global__ void minmax_apply(const T* __restrict__ in, std::int64_t groups, std::int64_t len,
                             const float* __restrict__ lo, const float* __restrict__ hi, int parts, O* __restrict__ out) {
  __shared__ float smn, smx;
  for (std::int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    if (threadIdx.x == 0) {
      float a = INFINITY, b = -INFINITY;
      for (int p = 0; p < parts; ++p) {
        a = fminf(a, lo[g * parts + p]);
        b = fmaxf(b, hi[g * parts + p]);
      }
      smn = a;
      smx = b;
    }
    __syncthreads();
    const float mn = smn, mx = smx;
    const float range = __fsub_rn(mx, mn);
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      // minmax_scale (reduce.h) with NumPy's roundings (no contraction): a constant group, +inf ones
      // included, maps to 0 (the test is hi == lo, not range == 0: inf - inf is NaN).
      const float v = mx == mn ? 0.f
                               : __fdiv_rn(__fmul_rn(__fsub_rn(static_cast<float>(in[g * len + i]), mn), 255.f), range);
      out[g * len + i] = static_cast<O>(v);
    }
    __syncthreads();  // smn/smx are rewritten for the next group
  }
}

template <class T>
__global__ void sum_partial(const T* __restrict__ in, std::int64_t groups, std::int64_t len, double* __restrict__ part) {
  __shared__ double s[kThreads];
  for (std::int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    double acc = 0;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
      acc += static_cast<double>(in[g * len + i]);
    const double total = block_sum(acc, s);
    if (threadIdx.x == 0) part[g * gridDim.x + blockIdx.x] = total;
  }
}

// One thread per group.
__global__ void sum_final(const double* __restrict__ part, int parts, std::int64_t groups, std::int64_t len,
                          double* __restrict__ out) {
  for (std::int64_t g = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int p = 0; p < parts; ++p) s += part[g * parts + p];
    out[g] = s / static_cast<double>(len);
  }
}

template <class T>
void mean_typed(const T* in, double* out, std::int64_t groups, std::int64_t len, cudaStream_t stream) {
  const Launch l = per_group_launch(groups, len);
  Scratch<double> part(static_cast<std::size_t>(groups) * l.grid.x, stream);
  sum_partial<T><<<as_dim3(l.grid), as_dim3(l.block), 0, stream>>>(in, groups, len, part.get());
  GF_CUDA_CHECK_LAUNCH();
  const Launch f = flat_launch(groups, 128);
  sum_final<<<as_dim3(f.grid), as_dim3(f.block), 0, stream>>>(part.get(), static_cast<int>(l.grid.x), groups, len,
                                                              out);
  GF_CUDA_CHECK_LAUNCH();
}

template <class T>
std::int64_t normalize_typed(const T* in, const ArrayRef& out, std::int64_t groups, std::int64_t len,
                             cudaStream_t stream) {
  constexpr bool kFloat = std::is_floating_point_v<T>;
  const Launch l = per_group_launch(groups, len);
  const std::size_t parts = static_cast<std::size_t>(groups) * l.grid.x;
  Scratch<float> lo(parts, stream), hi(parts, stream);
  Scratch<unsigned long long> nan_at(kFloat ? 1 : 0, stream);
  if constexpr (kFloat) GFK_CUDA_TRY(cudaMemsetAsync(nan_at.get(), 0xff, sizeof(unsigned long long), stream));
  minmax_partial<T, kFloat><<<as_dim3(l.grid), as_dim3(l.block), 0, stream>>>(in, groups, len, lo.get(), hi.get(),
                                                                              nan_at.get());
  GF_CUDA_CHECK_LAUNCH();
  if constexpr (kFloat) {
    // The one deliberate host synchronisation of the kernels: the CPU path raises ValueError on NaN
    // (normalize_minmax's contract), so a float input waits here for its min/max pass (integer inputs
    // cannot hold NaN and never wait). The apply pass is not queued when a NaN was found.
    unsigned long long first = kNoNaN;
    GFK_CUDA_TRY(cudaMemcpyAsync(&first, nan_at.get(), sizeof first, cudaMemcpyDeviceToHost, stream));
    GFK_CUDA_TRY(cudaStreamSynchronize(stream));
    if (first != kNoNaN) return static_cast<std::int64_t>(first);
  }
  if (out.dtype == DType::U8)
    minmax_apply<T, std::uint8_t><<<as_dim3(l.grid), as_dim3(l.block), 0, stream>>>(
        in, groups, len, lo.get(), hi.get(), static_cast<int>(l.grid.x), out.ptr<std::uint8_t>());
  else
    minmax_apply<T, float><<<as_dim3(l.grid), as_dim3(l.block), 0, stream>>>(
        in, groups, len, lo.get(), hi.get(), static_cast<int>(l.grid.x), out.ptr<float>());
  GF_CUDA_CHECK_LAUNCH();
  return -1;
}

}  // namespace

void launch_mean_f32(const float* in, double* out, std::int64_t groups, std::int64_t len, cudaStream_t stream) {
  mean_typed(in, out, groups, len, stream);
}

void mean_cuda(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  DeviceGuard guard(in.device.index);
  const std::int64_t len = in.numel() / groups;
  const cudaStream_t s = as_stream(in.stream);
  double* o = out.ptr<double>();
  switch (in.dtype) {
    case DType::U8: mean_typed(in.ptr<const std::uint8_t>(), o, groups, len, s); break;
    case DType::I32: mean_typed(in.ptr<const std::int32_t>(), o, groups, len, s); break;
    case DType::I64: mean_typed(in.ptr<const std::int64_t>(), o, groups, len, s); break;
    case DType::F32: mean_typed(in.ptr<const float>(), o, groups, len, s); break;
    case DType::F64: mean_typed(in.ptr<const double>(), o, groups, len, s); break;
  }
}

std::int64_t normalize_minmax_cuda(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  DeviceGuard guard(in.device.index);
  const std::int64_t len = in.numel() / groups;
  const cudaStream_t s = as_stream(in.stream);
  switch (in.dtype) {
    case DType::U8: return normalize_typed(in.ptr<const std::uint8_t>(), out, groups, len, s);
    case DType::I32: return normalize_typed(in.ptr<const std::int32_t>(), out, groups, len, s);
    case DType::I64: return normalize_typed(in.ptr<const std::int64_t>(), out, groups, len, s);
    case DType::F32: return normalize_typed(in.ptr<const float>(), out, groups, len, s);
    case DType::F64: return normalize_typed(in.ptr<const double>(), out, groups, len, s);
  }
  return -1;
}

}  // namespace gpufleet::kernels
