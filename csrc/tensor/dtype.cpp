// DType names, sizes, DLPack codes; binary16 and bfloat16 conversions.
#include "tensor/dtype.h"

#include <array>
#include <cmath>

#include "common/error.h"

namespace gpufleet {

namespace {
struct DTypeFacts {
  std::string_view name;
  std::size_t size;
  DLDataTypeCode code;
};
constexpr std::array<DTypeFacts, kNumDTypes> kFacts = {{
    {"bool", 1, kDLBool},
    {"uint8", 1, kDLUInt},
    {"int8", 1, kDLInt},
    {"int16", 2, kDLInt},
    {"int32", 4, kDLInt},
    {"int64", 8, kDLInt},
    {"float16", 2, kDLFloat},
    {"bfloat16", 2, kDLBfloat},
    {"float32", 4, kDLFloat},
    {"float64", 8, kDLFloat},
}};
const DTypeFacts& facts(DType d) {
  const auto i = static_cast<std::size_t>(d);
  GF_ASSERT(i < kFacts.size(), "bad dtype {}", i);
  return kFacts[i];
}
}  // namespace

std::size_t itemsize(DType dtype) { return facts(dtype).size; }
std::string_view dtype_name(DType dtype) { return facts(dtype).name; }
bool is_floating_point(DType d) {
  return d == DType::Float16 || d == DType::BFloat16 || d == DType::Float32 || d == DType::Float64;
}

std::string accepted_dtype_names() {
  return "bool, uint8, int8, int16, int32, int64, float16 (half), bfloat16, float32 (float), "
         "float64 (double)";
}

DType parse_dtype(std::string_view text) {
  std::string_view t = text;
  if (t.substr(0, 6) == "torch.") t.remove_prefix(6);
  for (int i = 0; i < kNumDTypes; ++i)
    if (kFacts[i].name == t) return static_cast<DType>(i);
  if (t == "bool_") return DType::Bool;
  if (t == "half") return DType::Float16;
  if (t == "float") return DType::Float32;
  if (t == "double") return DType::Float64;
  if (t == "short") return DType::Int16;
  if (t == "int") return DType::Int32;
  if (t == "long") return DType::Int64;
  throw TypeError_(fmt::format("unsupported dtype '{}': gpufleet tensors hold {}", text, accepted_dtype_names()));
}

DLDataType to_dlpack_dtype(DType dtype) {
  const auto& f = facts(dtype);
  return DLDataType{static_cast<std::uint8_t>(f.code), static_cast<std::uint8_t>(f.size * 8), 1};
}

DType from_dlpack_dtype(DLDataType dt) {
  if (dt.lanes == 1) {
    for (int i = 0; i < kNumDTypes; ++i)
      if (kFacts[i].code == dt.code && kFacts[i].size * 8 == dt.bits) return static_cast<DType>(i);
    // Old producers export bool as kDLUInt with 8 bits; that is uint8 here, which is what it holds.
  }
  throw TypeError_(fmt::format("unsupported DLPack dtype (code={}, bits={}, lanes={}): gpufleet tensors hold {}",
                               dt.code, dt.bits, dt.lanes, accepted_dtype_names()));
}

// Note [binary16 rounding]: these follow NumPy's halffloat.c bit for bit (round half to even,
// overflow to infinity, NaN payloads truncated but kept NaN), so that float32/float64 -> float16
// conversions agree with ndarray.astype exactly.
std::uint16_t float_to_half_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint32_t sign = (x & 0x80000000u) >> 16;
  std::uint32_t exp = x & 0x7f800000u;
  if (exp >= 0x47800000u) {  // overflow, inf or nan
    if (exp == 0x7f800000u) {
      std::uint32_t m = x & 0x007fffffu;
      if (m != 0) {
        std::uint16_t r = static_cast<std::uint16_t>(0x7c00u + (m >> 13));
        if (r == 0x7c00u) r++;  // keep it a NaN
        return static_cast<std::uint16_t>(sign + r);
      }
      return static_cast<std::uint16_t>(sign + 0x7c00u);
    }
    return static_cast<std::uint16_t>(sign + 0x7c00u);
  }
  if (exp <= 0x38000000u) {  // subnormal or zero in half
    if (exp < 0x33000000u) return static_cast<std::uint16_t>(sign);
    const int e = static_cast<int>(exp >> 23);
    const std::uint32_t m = 0x00800000u + (x & 0x007fffffu);
    const int shift = 126 - e;  // 14..24: the result is in units of 2^-24
    std::uint32_t shifted = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (shifted & 1u))) shifted++;
    return static_cast<std::uint16_t>(sign + shifted);
  }
  exp = exp - 0x38000000u;
  std::uint32_t m = x & 0x007fffffu;
  std::uint32_t h = (exp >> 13) + (m >> 13);
  std::uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;  // may carry into the exponent: correct
  return static_cast<std::uint16_t>(sign + h);
}

std::uint16_t double_to_half_bits(double d) {
  std::uint64_t x;
  std::memcpy(&x, &d, sizeof x);
  const std::uint16_t sign = static_cast<std::uint16_t>((x & 0x8000000000000000ull) >> 48);
  std::uint64_t exp = x & 0x7ff0000000000000ull;
  if (exp >= 0x40f0000000000000ull) {
    if (exp == 0x7ff0000000000000ull) {
      std::uint64_t m = x & 0x000fffffffffffffull;
      if (m != 0) {
        std::uint16_t r = static_cast<std::uint16_t>(0x7c00u + (m >> 42));
        if (r == 0x7c00u) r++;
        return static_cast<std::uint16_t>(sign + r);
      }
    }
    return static_cast<std::uint16_t>(sign + 0x7c00u);
  }
  if (exp <= 0x3f00000000000000ull) {
    if (exp < 0x3e60000000000000ull) return sign;
    const int e = static_cast<int>(exp >> 52);
    std::uint64_t m = 0x0010000000000000ull + (x & 0x000fffffffffffffull);
    const int shift = 1051 - e;  // so that the result is in units of 2^-24
    std::uint64_t shifted = m >> shift;
    std::uint64_t rem = m & ((1ull << shift) - 1);
    std::uint64_t halfway = 1ull << (shift - 1);
    if (rem > halfway || (rem == halfway && (shifted & 1u))) shifted++;
    return static_cast<std::uint16_t>(sign + shifted);
  }
  exp = exp - 0x3f00000000000000ull;
  std::uint64_t m = x & 0x000fffffffffffffull;
  std::uint64_t h = (exp >> 42) + (m >> 42);
  std::uint64_t rem = m & 0x3ffffffffffull;
  if (rem > 0x20000000000ull || (rem == 0x20000000000ull && (h & 1u))) h++;
  return static_cast<std::uint16_t>(sign + h);
}

float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = h & 0x7c00u;
  std::uint32_t m = h & 0x03ffu;
  std::uint32_t out;
  if (exp == 0) {
    if (m == 0) {
      out = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x0400u) == 0);
      out = sign | (static_cast<std::uint32_t>(112 - e) << 23) | ((m & 0x03ffu) << 13);
    }
  } else if (exp == 0x7c00u) {
    out = sign | 0x7f800000u | (m << 13);
  } else {
    out = sign | ((exp + 0x1c000u) << 13) | (m << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

std::uint16_t float_to_bfloat16_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if (std::isnan(f)) return 0x7fc0u;  // PyTorch's canonical bfloat16 NaN
  const std::uint32_t rounding_bias = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>((x + rounding_bias) >> 16);
}

}  // namespace gpufleet
