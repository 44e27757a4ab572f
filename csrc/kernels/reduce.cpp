// normalize_minmax and mean front ends (see reduce.h).
#include "kernels/reduce.h"

#include "common/error.h"

namespace gpufleet::kernels {

namespace {
void check_groups(const ArrayRef& in, std::int64_t groups, const char* op) {
  GF_CHECK_ARG(in.numel() > 0, "{}: got an empty {}: expected at least one value", op, in.describe());
  GF_ASSERT(groups >= 1 && in.numel() % groups == 0, "{} groups of {}", groups, in.describe());
}
}  // namespace

void normalize_minmax(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  check_groups(in, groups, "normalize_minmax");
  GF_CHECK_ARG(out.dtype == DType::U8 || out.dtype == DType::F32,
               "normalize_minmax: output dtype {} is not supported: expected uint8 or float32", dtype_name(out.dtype));
  GF_ASSERT(out.numel() == in.numel() && out.device == in.device, "output {} for {}", out.describe(), in.describe());
  std::int64_t nan_at = -1;
  if (in.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    nan_at = normalize_minmax_cuda(in, out, groups);
#else
    throw_no_cuda("normalize_minmax");
#endif
  } else {
    nan_at = normalize_minmax_cpu(in, out, groups);
  }
  GF_CHECK_ARG(nan_at < 0, "normalize_minmax: NaN at flat index {} of the {}: expected no NaN", nan_at, in.describe());
}

void mean(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  check_groups(in, groups, "mean");
  GF_ASSERT(out.dtype == DType::F64 && out.numel() == groups && out.device == in.device, "output {} for {}",
            out.describe(), in.describe());
  if (in.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    mean_cuda(in, out, groups);
    return;
#else
    throw_no_cuda("mean");
#endif
  }
  mean_cpu(in, out, groups);
}

}  // namespace gpufleet::kernels
