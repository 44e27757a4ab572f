// Host strided copy with dtype conversion, and host fill. Conversions follow NumPy's astype on
// x86-64 (Note [binary16 rounding]; float -> integer truncates toward zero, and values outside the
// target's range give what NumPy gives there: the "integer indefinite" INT_MIN of cvttsd2si,
// truncated for narrow types), and PyTorch's rules for bfloat16 (round to nearest even from float32;
// float64 goes through float32).
#include <array>
#include <cmath>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GPUFLEET_HAVE_F16C_PATH 1
#endif

#include "common/error.h"
#include "tensor/tensor.h"

namespace gpufleet::detail {

namespace {

// The C++ type stored for each dtype (bool is stored as a byte and read as "byte != 0").
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

// Reads a stored value as the arithmetic type conversions start from.
template <DType D>
inline auto load(typename Stored<D>::type v) {
  if constexpr (D == DType::Bool) return static_cast<std::int64_t>(v != 0);
  else if constexpr (D == DType::Float16) return half_bits_to_float(v);
  else if constexpr (D == DType::BFloat16) return bfloat16_bits_to_float(v);
  else return v;
}

template <class I, class F>
inline I float_to_int(F v) {
  if constexpr (sizeof(I) == 8) {
    if (!(v >= F(-9223372036854775808.0) && v < F(9223372036854775808.0))) return static_cast<I>(INT64_MIN);
    return static_cast<I>(static_cast<std::int64_t>(v));
  } else {
    const std::int32_t r =
        (v >= F(-2147483648.0) && v < F(2147483648.0)) ? static_cast<std::int32_t>(v) : INT32_MIN;
    return static_cast<I>(r);
  }
}

template <DType D, class V>
inline typename Stored<D>::type store(V v) {
  using T = typename Stored<D>::type;
  if constexpr (D == DType::Bool) {
    return static_cast<T>(v != V(0));
  } else if constexpr (D == DType::Float16) {
    if constexpr (std::is_same_v<V, double>) return double_to_half_bits(v);
    else return float_to_half_bits(static_cast<float>(v));
  } else if constexpr (D == DType::BFloat16) {
    return float_to_bfloat16_bits(static_cast<float>(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(v);
  } else if constexpr (std::is_floating_point_v<V>) {
    return float_to_int<T>(v);
  } else {
    return static_cast<T>(v);
  }
}

using Kernel = void (*)(char* dst, std::int64_t ds, const char* src, std::int64_t ss, std::int64_t n);

template <DType DD, DType SD>
void convert_kernel(char* dst, std::int64_t ds, const char* src, std::int64_t ss, std::int64_t n) {
  using DT = typename Stored<DD>::type;
  using ST = typename Stored<SD>::type;
  auto* d = reinterpret_cast<DT*>(dst);
  const auto* s = reinterpret_cast<const ST*>(src);
  if (ds == 1 && ss == 1) {
    for (std::int64_t i = 0; i < n; ++i) d[i] = store<DD>(load<SD>(s[i]));
  } else {
    for (std::int64_t i = 0; i < n; ++i) d[i * ds] = store<DD>(load<SD>(s[i * ss]));
  }
}

template <DType DD, std::size_t... S>
constexpr std::array<Kernel, kNumDTypes> row(std::index_sequence<S...>) {
  return {convert_kernel<DD, static_cast<DType>(S)>...};
}
template <std::size_t... D>
constexpr std::array<std::array<Kernel, kNumDTypes>, kNumDTypes> table(std::index_sequence<D...>) {
  return {row<static_cast<DType>(D)>(std::make_index_sequence<kNumDTypes>{})...};
}
constexpr auto kKernels = table(std::make_index_sequence<kNumDTypes>{});

// Applies `k` over `shape`: the innermost dimension is the kernel's loop, the others an odometer.
void strided_apply(Kernel k, char* dst, const Shape& dstr, std::size_t dsize, const char* src, const Shape& sstr,
                   std::size_t ssize, const Shape& shape) {
  // Drop size-1 dimensions, then merge dimensions that are compact with respect to both operands
  // (fewer, longer inner loops). Afterwards index 0 is the innermost dimension.
  Shape sh, ds, ss;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    if (shape[i] == 1) continue;
    if (sh.empty()) {
      sh.push_back(shape[i]);
      ds.push_back(dstr[i]);
      ss.push_back(sstr[i]);
    } else if (ds.back() * sh.back() == dstr[i] && ss.back() * sh.back() == sstr[i]) {
      sh.back() *= shape[i];
    } else {
      sh.push_back(shape[i]);
      ds.push_back(dstr[i]);
      ss.push_back(sstr[i]);
    }
  }
  if (sh.empty()) {  // a single element
    k(dst, 1, src, 1, 1);
    return;
  }
  const int m = static_cast<int>(sh.size());
  std::vector<std::int64_t> idx(m, 0);
  const std::int64_t inner = sh[0];
  for (;;) {
    std::int64_t doff = 0, soff = 0;
    for (int i = 1; i < m; ++i) {
      doff += idx[i] * ds[i];
      soff += idx[i] * ss[i];
    }
    k(dst + doff * static_cast<std::int64_t>(dsize), ds[0], src + soff * static_cast<std::int64_t>(ssize), ss[0],
      inner);
    int i = 1;
    for (; i < m; ++i) {
      if (++idx[i] < sh[i]) break;
      idx[i] = 0;
    }
    if (i == m) return;
  }
}

#if GPUFLEET_HAVE_F16C_PATH
// Note [F16C]: with the F16C instructions (checked at run time; the build targets baseline x86-64)
// float32 <-> float16 runs eight lanes at a time with round-to-nearest-even, which gives the same
// bits as Note [binary16 rounding] for every number; only NaN payloads may differ (still NaN).
bool have_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}

__attribute__((target("avx,f16c"))) void f32_to_f16(std::uint16_t* d, const float* s, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  for (; i < n; ++i) d[i] = float_to_half_bits(s[i]);
}

__attribute__((target("avx,f16c"))) void f16_to_f32(float* d, const std::uint16_t* s, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = half_bits_to_float(s[i]);
}
#endif

}  // namespace

void cpu_copy(const Tensor& dst, const Tensor& src) {
  GF_ASSERT(dst.shape() == src.shape(), "cpu_copy shapes {} and {}", shape_str(dst.shape()), shape_str(src.shape()));
  if (dst.numel() == 0) return;
  if (dst.dtype() == src.dtype() && dst.is_contiguous() && src.is_contiguous()) {
    std::memcpy(dst.data_ptr(), src.data_ptr(), dst.nbytes());
    return;
  }
#if GPUFLEET_HAVE_F16C_PATH
  if (dst.is_contiguous() && src.is_contiguous() && have_f16c()) {
    if (dst.dtype() == DType::Float16 && src.dtype() == DType::Float32) {
      f32_to_f16(static_cast<std::uint16_t*>(dst.data_ptr()), static_cast<const float*>(src.data_ptr()), dst.numel());
      return;
    }
    if (dst.dtype() == DType::Float32 && src.dtype() == DType::Float16) {
      f16_to_f32(static_cast<float*>(dst.data_ptr()), static_cast<const std::uint16_t*>(src.data_ptr()), dst.numel());
      return;
    }
  }
#endif
  Kernel k = kKernels[static_cast<int>(dst.dtype())][static_cast<int>(src.dtype())];
  strided_apply(k, static_cast<char*>(dst.data_ptr()), dst.strides(), dst.itemsize(),
                static_cast<const char*>(src.data_ptr()), src.strides(), src.itemsize(), dst.shape());
}

void cpu_fill(const Tensor& dst, Scalar value) {
  if (dst.numel() == 0) return;
  const Shape zero(dst.ndim(), 0);
  std::visit(
      [&](auto v) {
        constexpr DType SD = std::is_same_v<decltype(v), double> ? DType::Float64 : DType::Int64;
        Kernel k = kKernels[static_cast<int>(dst.dtype())][static_cast<int>(SD)];
        strided_apply(k, static_cast<char*>(dst.data_ptr()), dst.strides(), dst.itemsize(),
                      reinterpret_cast<const char*>(&v), zero, sizeof v, dst.shape());
      },
      value);
}

}  // namespace gpufleet::detail
