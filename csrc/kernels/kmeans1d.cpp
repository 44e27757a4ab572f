// kmeans1d front end (see kmeans1d.h).
#include "kernels/kmeans1d.h"

#include <cmath>

#include "common/error.h"

namespace gpufleet::kernels {

void check_kmeans(const ArrayRef& values, const KMeansArgs& a) {
  GF_CHECK_ARG(values.dtype == DType::U8 || values.dtype == DType::F32 || values.dtype == DType::F64,
               "kmeans1d: unsupported {}: expected uint8, float32 or float64 values", values.describe());
  GF_CHECK_ARG(values.numel() > 0, "kmeans1d: got an empty {}: expected at least one value", values.describe());
  GF_CHECK_ARG(a.k >= 1 && a.k <= 256, "kmeans1d: k={} is invalid: expected an integer from 1 to 256", a.k);
  GF_CHECK_ARG(a.sample == 0 || (std::isfinite(a.sample) && a.sample > 0 && a.sample <= 1),
               "kmeans1d: sample={} is invalid: expected a fraction in (0, 1] or None", a.sample);
  GF_CHECK_ARG(a.n_init >= 1, "kmeans1d: n_init={} is invalid: expected an integer >= 1", a.n_init);
  GF_CHECK_ARG(a.max_iter >= 1, "kmeans1d: max_iter={} is invalid: expected an integer >= 1", a.max_iter);
  GF_CHECK_ARG(std::isfinite(a.tol) && a.tol >= 0, "kmeans1d: tol={} is invalid: expected a number >= 0", a.tol);
}

void kmeans1d(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& args, bool per_image) {
  check_kmeans(values, args);
  if (values.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    kmeans1d_cuda(values, out, args, per_image);
    return;
#else
    throw_no_cuda("kmeans1d");
#endif
  }
  kmeans1d_cpu(values, out, args, per_image);
}

void kmeans_label_lut(const double* centres, int clusters, std::int32_t lut[256]) {
  int label = 0;
  for (int v = 0; v < 256; ++v) {
    // Past the midpoint to the next centre, that centre is strictly nearer: ties stay with the lower label.
    while (label + 1 < clusters && v > 0.5 * (centres[label] + centres[label + 1])) ++label;
    lut[v] = label;
  }
}

}  // namespace gpufleet::kernels
