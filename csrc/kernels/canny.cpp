// canny front end (see canny.h and Note [Canny rules]).
#include "kernels/canny.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace gpufleet::kernels {

CannyThresholds canny_thresholds(const CannyArgs& a) {
  GF_CHECK_ARG(std::isfinite(a.low) && std::isfinite(a.high),
               "canny: thresholds ({}, {}) are invalid: expected finite numbers", a.low, a.high);
  double low = a.low, high = a.high;
  if (low > high) std::swap(low, high);
  if (a.l2gradient) {
    low = std::min(32767.0, low);
    high = std::min(32767.0, high);
    if (low > 0) low *= low;
    if (high > 0) high *= high;
  }
  // Magnitudes lie in [0, 2 * 1020^2]; clamping keeps the integers small without changing a comparison.
  auto clampd = [](double v) { return std::clamp(v, -1.0, 4.2e6); };
  return {static_cast<std::int64_t>(std::floor(clampd(low))), static_cast<std::int64_t>(std::floor(clampd(high)))};
}

void canny(const ArrayRef& in, const ArrayRef& out, const CannyArgs& args) {
  as_batch(in, "canny(image)");
  GF_CHECK_ARG(in.dtype == DType::U8, "canny: unsupported {}: expected uint8 (as cv2.Canny)", in.describe());
  GF_ASSERT(out.dtype == DType::U8 && out.shape == in.shape && out.device == in.device, "output {} for input {}",
            out.describe(), in.describe());
  const CannyThresholds t = canny_thresholds(args);
  if (in.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    canny_cuda(in, out, t, args.l2gradient);
    return;
#else
    throw_no_cuda("canny");
#endif
  }
  canny_cpu(in, out, t, args.l2gradient);
}

}  // namespace gpufleet::kernels
