// congestion_score front end (see congestion.h).
#include "kernels/congestion.h"

#include <cmath>

#include "common/error.h"
#include "kernels/canny.h"
#include "kernels/gaussian_blur.h"
#include "kernels/kmeans1d.h"
#include "kernels/reduce.h"

namespace gpufleet::kernels {

std::uint8_t normalized_label(int l, int lmin, int lmax) {
  return static_cast<std::uint8_t>(
      minmax_scale(static_cast<float>(l), static_cast<float>(lmin), static_cast<float>(lmax)));
}

void check_congestion(const ArrayRef& depth, const CongestionArgs& a) {
  const Batch b = as_batch(depth, "congestion_score(depth)");
  GF_CHECK_ARG(depth.dtype == DType::U8 || depth.dtype == DType::F32 || depth.dtype == DType::F64,
               "congestion_score: unsupported depth {}: expected uint8, float32 or float64", depth.describe());
  KMeansArgs km;
  km.k = a.k;
  check_kmeans(depth, km);
  canny_thresholds({a.low, a.high, false});
  BlurArgs blur;
  blur.ksize_x = blur.ksize_y = a.ksize;
  blur.sigma = a.sigma;
  plan_gaussian_blur(blur, DType::F32, b.h, b.w);
}

void congestion_score(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& args) {
  check_congestion(depth, args);
  if (depth.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    congestion_score_cuda(depth, out, args);
    return;
#else
    throw_no_cuda("congestion_score");
#endif
  }
  congestion_score_cpu(depth, out, args);
}

}  // namespace gpufleet::kernels
