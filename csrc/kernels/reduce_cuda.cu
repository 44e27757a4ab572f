// normalize_minmax and mean on CUDA: per-(group, block) partial results, then a pass that combines
// them; two launches per operation for the whole batch, deterministic (no floating-point atomics).
#include <cfloat>
#include <cstdint>

#include "kernels/cuda_util.h"
#include "kernels/kernels_cuda.cuh"
#include "kernels/reduce.h"

namespace gpufleet::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerGroup = 64;

template <class T>
__global__ void minmax_partial(const T* __restrict__ in, std::int64_t len, float* __restrict__ lo,
                               float* __restrict__ hi) {
  __shared__ float slo[kThreads], shi[kThreads];
  const std::int64_t g = blockIdx.y;
  const T* src = in + g * len;
  float mn = FLT_MAX, mx = -FLT_MAX;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = static_cast<float>(src[i]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
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
}

template <class T, class O>
__global__ void minmax_apply(const T* __restrict__ in, std::int64_t len, const float* __restrict__ lo,
                             const float* __restrict__ hi, int parts, O* __restrict__ out) {
  __shared__ float mn, mx;
  const std::int64_t g = blockIdx.y;
  if (threadIdx.x == 0) {
    float a = FLT_MAX, b = -FLT_MAX;
    for (int p = 0; p < parts; ++p) {
      a = fminf(a, lo[g * parts + p]);
      b = fmaxf(b, hi[g * parts + p]);
    }
    mn = a;
    mx = b;
  }
  __syncthreads();
  const float range = __fsub_rn(mx, mn);
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    // The seed's formula in float32 with NumPy's roundings (no contraction).
    const float v = range == 0.f ? 0.f
                                 : __fdiv_rn(__fmul_rn(__fsub_rn(static_cast<float>(in[g * len + i]), mn), 255.f), range);
    out[g * len + i] = static_cast<O>(v);
  }
}

template <class T>
__global__ void sum_partial(const T* __restrict__ in, std::int64_t len, double* __restrict__ part) {
  __shared__ double s[kThreads];
  const std::int64_t g = blockIdx.y;
  double acc = 0;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    acc += static_cast<double>(in[g * len + i]);
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[g * gridDim.x + blockIdx.x] = s[0];
}

__global__ void sum_final(const double* __restrict__ part, int parts, std::int64_t len, double* __restrict__ out) {
  const std::int64_t g = blockIdx.x;
  if (threadIdx.x == 0) {
    double s = 0;
    for (int p = 0; p < parts; ++p) s += part[g * parts + p];
    out[g] = s / static_cast<double>(len);
  }
}

template <class T>
void mean_typed(const T* in, double* out, std::int64_t groups, std::int64_t len, cudaStream_t stream) {
  GFK_CHECK_ARG(groups <= 65535, "mean: {} groups are too many for one CUDA launch (at most 65535)", groups);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(kBlocksPerGroup, (len + kThreads - 1) / kThreads));
  Scratch<double> part(static_cast<std::size_t>(groups) * blocks, stream);
  sum_partial<T><<<dim3(blocks, static_cast<unsigned>(groups)), kThreads, 0, stream>>>(in, len, part.get());
  GF_CUDA_CHECK_LAUNCH();
  sum_final<<<static_cast<unsigned>(groups), 32, 0, stream>>>(part.get(), static_cast<int>(blocks), len, out);
  GF_CUDA_CHECK_LAUNCH();
}

template <class T>
void normalize_typed(const T* in, const ArrayRef& out, std::int64_t groups, std::int64_t len, cudaStream_t stream) {
  GFK_CHECK_ARG(groups <= 65535, "normalize_minmax: {} images are too many for one CUDA launch (at most 65535)", groups);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(kBlocksPerGroup, (len + kThreads - 1) / kThreads));
  Scratch<float> lo(static_cast<std::size_t>(groups) * blocks, stream), hi(static_cast<std::size_t>(groups) * blocks, stream);
  const dim3 grid(blocks, static_cast<unsigned>(groups));
  minmax_partial<T><<<grid, kThreads, 0, stream>>>(in, len, lo.get(), hi.get());
  GF_CUDA_CHECK_LAUNCH();
  if (out.dtype == DType::U8)
    minmax_apply<T, std::uint8_t><<<grid, kThreads, 0, stream>>>(in, len, lo.get(), hi.get(), blocks, out.ptr<std::uint8_t>());
  else
    minmax_apply<T, float><<<grid, kThreads, 0, stream>>>(in, len, lo.get(), hi.get(), blocks, out.ptr<float>());
  GF_CUDA_CHECK_LAUNCH();
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

void normalize_minmax_cuda(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  DeviceGuard guard(in.device.index);
  const std::int64_t len = in.numel() / groups;
  const cudaStream_t s = as_stream(in.stream);
  switch (in.dtype) {
    case DType::U8: normalize_typed(in.ptr<const std::uint8_t>(), out, groups, len, s); break;
    case DType::I32: normalize_typed(in.ptr<const std::int32_t>(), out, groups, len, s); break;
    case DType::I64: normalize_typed(in.ptr<const std::int64_t>(), out, groups, len, s); break;
    case DType::F32: normalize_typed(in.ptr<const float>(), out, groups, len, s); break;
    case DType::F64: normalize_typed(in.ptr<const double>(), out, groups, len, s); break;
  }
}

}  // namespace gpufleet::kernels
