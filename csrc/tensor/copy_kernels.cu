// CUDA slot: the device-side strided copy with dtype conversion (same rules as copy_cpu.cpp: integer
// sources go through int64, floating sources through double, so every conversion rounds once).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>

#include "tensor/copy_kernels.h"

namespace gpufleet::cuda_backend {

namespace {
using Geometry = CopyGeometry;

template <DType D> struct Stored;
template <> struct Stored<DType::Bool> { using type = std::uint8_t; };
template <> struct Stored<DType::UInt8> { using type = std::uint8_t; };
template <> struct Stored<DType::Int8> { using type = std::int8_t; };
template <> struct Stored<DType::Int16> { using type = std::int16_t; };
template <> struct Stored<DType::Int32> { using type = std::int32_t; };
template <> struct Stored<DType::Int64> { using type = std::int64_t; };
template <> struct Stored<DType::Float16> { using type = std::uint16_t; };
template <> struct Stored<DType::BFloat16> { using type = std::uint16_t; };
template <> struct Stored<DType::Float32> { using type = float; };
template <> struct Stored<DType::Float64> { using type = double; };

template <class I>
__device__ I double_to_int(double v) {
  if constexpr (sizeof(I) == 8) {
    if (!(v >= -9223372036854775808.0 && v < 9223372036854775808.0)) return static_cast<I>(LLONG_MIN);
    return static_cast<I>(static_cast<long long>(v));
  } else {
    const int r = (v >= -2147483648.0 && v < 2147483648.0) ? static_cast<int>(v) : INT_MIN;
    return static_cast<I>(r);
  }
}

template <DType D>
__device__ typename Stored<D>::type from_int(long long v) {
  using T = typename Stored<D>::type;
  if constexpr (D == DType::Bool) return static_cast<T>(v != 0);
  else if constexpr (D == DType::Float16) return __half_as_ushort(__float2half_rn(static_cast<float>(v)));
  else if constexpr (D == DType::BFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)));
  else return static_cast<T>(v);
}

template <DType D>
__device__ typename Stored<D>::type from_double(double v) {
  using T = typename Stored<D>::type;
  if constexpr (D == DType::Bool) return static_cast<T>(v != 0.0);
  else if constexpr (D == DType::Float16) return __half_as_ushort(__double2half(v));
  else if constexpr (D == DType::BFloat16) return __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)));
  else if constexpr (D == DType::Float32 || D == DType::Float64) return static_cast<T>(v);
  else return double_to_int<T>(v);
}

template <DType D>
__global__ void strided_copy_kernel(char* dst, const char* src, int src_dtype, Geometry g, std::int64_t n) {
  using T = typename Stored<D>::type;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    std::int64_t rem = i, doff = 0, soff = 0;
    for (int k = 0; k < g.ndim; ++k) {  // index 0 is the innermost dimension
      const std::int64_t idx = rem % g.sizes[k];
      rem /= g.sizes[k];
      doff += idx * g.dst_strides[k];
      soff += idx * g.src_strides[k];
    }
    T* d = reinterpret_cast<T*>(dst) + doff;
    switch (static_cast<DType>(src_dtype)) {
      case DType::Bool: *d = from_int<D>(reinterpret_cast<const std::uint8_t*>(src)[soff] != 0); break;
      case DType::UInt8: *d = from_int<D>(reinterpret_cast<const std::uint8_t*>(src)[soff]); break;
      case DType::Int8: *d = from_int<D>(reinterpret_cast<const std::int8_t*>(src)[soff]); break;
      case DType::Int16: *d = from_int<D>(reinterpret_cast<const std::int16_t*>(src)[soff]); break;
      case DType::Int32: *d = from_int<D>(reinterpret_cast<const std::int32_t*>(src)[soff]); break;
      case DType::Int64: *d = from_int<D>(reinterpret_cast<const long long*>(src)[soff]); break;
      case DType::Float16:
        *d = from_double<D>(__half2float(__ushort_as_half(reinterpret_cast<const std::uint16_t*>(src)[soff])));
        break;
      case DType::BFloat16:
        *d = from_double<D>(
            __bfloat162float(__ushort_as_bfloat16(reinterpret_cast<const std::uint16_t*>(src)[soff])));
        break;
      case DType::Float32: *d = from_double<D>(reinterpret_cast<const float*>(src)[soff]); break;
      case DType::Float64: *d = from_double<D>(reinterpret_cast<const double*>(src)[soff]); break;
    }
  }
}

template <DType D>
void launch(char* dst, const char* src, DType sd, const Geometry& g, std::int64_t n, cudaStream_t stream) {
  const int threads = 256;
  const std::int64_t want = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  strided_copy_kernel<D><<<blocks, threads, 0, stream>>>(dst, src, static_cast<int>(sd), g, n);
}
}  // namespace

int launch_strided_copy_kernel(void* dst_ptr, DType dst_dtype, const void* src_ptr, DType src_dtype,
                               const CopyGeometry& g, std::int64_t n, void* stream_ptr) {
  auto* d = static_cast<char*>(dst_ptr);
  const auto* s = static_cast<const char*>(src_ptr);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dst_dtype) {
    case DType::Bool: launch<DType::Bool>(d, s, src_dtype, g, n, stream); break;
    case DType::UInt8: launch<DType::UInt8>(d, s, src_dtype, g, n, stream); break;
    case DType::Int8: launch<DType::Int8>(d, s, src_dtype, g, n, stream); break;
    case DType::Int16: launch<DType::Int16>(d, s, src_dtype, g, n, stream); break;
    case DType::Int32: launch<DType::Int32>(d, s, src_dtype, g, n, stream); break;
    case DType::Int64: launch<DType::Int64>(d, s, src_dtype, g, n, stream); break;
    case DType::Float16: launch<DType::Float16>(d, s, src_dtype, g, n, stream); break;
    case DType::BFloat16: launch<DType::BFloat16>(d, s, src_dtype, g, n, stream); break;
    case DType::Float32: launch<DType::Float32>(d, s, src_dtype, g, n, stream); break;
    case DType::Float64: launch<DType::Float64>(d, s, src_dtype, g, n, stream); break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace gpufleet::cuda_backend
