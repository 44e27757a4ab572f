#pragma once
/// Element types of gpufleet tensors, their names, sizes and DLPack codes, and the scalar
/// conversions shared by the CPU copy and (in spirit) the CUDA copy kernels.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "common/dlpack.h"

namespace gpufleet {

enum class DType : std::uint8_t {
  Bool,
  UInt8,
  Int8,
  Int16,
  Int32,
  Int64,
  Float16,
  BFloat16,
  Float32,
  Float64,
};
inline constexpr int kNumDTypes = 10;

/// Bytes per element.
std::size_t itemsize(DType dtype);
/// Canonical name: "bool", "uint8", ..., "bfloat16", "float32", "float64" (NumPy's names).
std::string_view dtype_name(DType dtype);
bool is_floating_point(DType dtype);
/// Parses a canonical name or an alias ("float"/"float32", "double", "half", "long", "int", "bool_",
/// "torch.float32"). Throws TypeError_ naming the text and the accepted names.
DType parse_dtype(std::string_view text);
/// The accepted dtype names, for error messages.
std::string accepted_dtype_names();

DLDataType to_dlpack_dtype(DType dtype);
/// Throws TypeError_ for types gpufleet has no dtype for (complex, vector lanes, odd widths).
DType from_dlpack_dtype(DLDataType dt);

/// IEEE binary16 and bfloat16 stored as their raw bits.
struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

/// float <-> binary16, round to nearest even, NaN kept NaN (NumPy's npy_float_to_half rules).
std::uint16_t float_to_half_bits(float f);
/// double -> binary16 in one rounding step (NumPy's npy_double_to_half), not via float.
std::uint16_t double_to_half_bits(double d);
float half_bits_to_float(std::uint16_t h);
/// float -> bfloat16, round to nearest even, NaN kept a quiet NaN (PyTorch's rule).
std::uint16_t float_to_bfloat16_bits(float f);
inline float bfloat16_bits_to_float(std::uint16_t b) {
  std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace gpufleet
