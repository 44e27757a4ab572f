#pragma once
/// normalize_minmax and mean: the seed's min-max scaling to uint8 and a double-accumulated mean, on
/// the CPU (reduce_cpu.cpp) or CUDA (reduce_cuda.cu).
#include <cstdint>

#include "kernels/array.h"

namespace gpufleet::kernels {

/// out = (x - min) * 255 / (max - min), computed in float32 exactly as NumPy evaluates the seed's
/// `(label_map - np.min(label_map)) * 255 / (np.max(label_map) - np.min(label_map))` on a float32
/// array; uint8 output truncates as `.astype(np.uint8)`. min and max are taken per group of
/// `in.numel() / groups` consecutive values (per image for a batch). A constant group maps to 0
/// (the seed divides by zero there). Input uint8, int32, int64, float32 or float64 (cast to float32
/// first, as the seed does: float64 values beyond float32's range become ±inf, and a group of +inf or
/// of -inf is constant); NaN raises ValueError naming the first one's flat index, on both backends
/// (on CUDA a float input waits for its min/max pass to know: reduce_cuda.cu). Output uint8 or float32.
void normalize_minmax(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);

/// out[g] = mean of the g-th of `groups` consecutive blocks of `in`, accumulated in double
/// (float64 output of `groups` elements).
void mean(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);

/// The seed's formula for one value (float32 arithmetic, no contraction).
inline float minmax_scale(float v, float lo, float hi) {
  if (hi == lo) return 0.0f;
  const volatile float t = (v - lo) * 255.0f;  // volatile: keep NumPy's two roundings even under FMA contraction
  return t / (hi - lo);
}

// Backends. normalize_minmax's return the flat index of the first NaN (nothing written then), or -1;
// the front end raises.
std::int64_t normalize_minmax_cpu(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);
void mean_cpu(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);
#if GPUFLEET_WITH_CUDA
std::int64_t normalize_minmax_cuda(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);
void mean_cuda(const ArrayRef& in, const ArrayRef& out, std::int64_t groups);
#endif

}  // namespace gpufleet::kernels
