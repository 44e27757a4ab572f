// gaussian_blur front end: arguments, OpenCV's size rules, taps, dispatch (see gaussian_blur.h).
#include "kernels/gaussian_blur.h"

#include <cmath>
#include <string>

#include "common/error.h"

namespace gpufleet::kernels {

Border parse_border(std::string_view name) {
  if (name == "replicate") return Border::Replicate;
  if (name == "reflect101" || name == "reflect_101" || name == "default") return Border::Reflect101;
  if (name == "constant") return Border::Constant;
  throw std::invalid_argument(fmt::format(
      "unknown border '{}': expected 'replicate' (aaa|abcd|ddd), 'reflect101' (cb|abcd|cb, OpenCV's "
      "default) or 'constant' (zeros)",
      name));
}

const char* border_name(Border b) {
  switch (b) {
    case Border::Replicate: return "replicate";
    case Border::Reflect101: return "reflect101";
    case Border::Constant: return "constant";
  }
  return "?";
}

std::vector<double> gaussian_kernel_f64(int n, double sigma) {
  GF_CHECK_ARG(n > 0 && n % 2 == 1, "gaussian kernel size {} is invalid: expected a positive odd integer", n);
  GF_CHECK_ARG(std::isfinite(sigma) && sigma > 0, "gaussian sigma {} is invalid: expected a finite number > 0", sigma);
  // The order of OpenCV's getGaussianKernelBitExact: x = 2i - (n-1), t = exp(x^2 * (-0.125 / sigma^2)),
  // sum = 2 * (sum of the left half) + 1 (the centre), taps t / sum, centre 1 / sum.
  const int half = (n - 1) / 2;
  const double scale2 = -0.125 / (sigma * sigma);
  std::vector<double> t(half);
  double sum = 0;
  for (int i = 0, x = 1 - n; i < half; ++i, x += 2) {
    t[i] = std::exp(static_cast<double>(x) * x * scale2);
    sum += t[i];
  }
  sum = sum * 2 + 1;
  const double mul = 1.0 / sum;
  std::vector<double> k(n);
  for (int i = 0; i < half; ++i) k[i] = k[n - 1 - i] = t[i] * mul;
  k[half] = mul;
  return k;
}

std::vector<float> gaussian_kernel(int n, double sigma) {
  const std::vector<double> d = gaussian_kernel_f64(n, sigma);
  return std::vector<float>(d.begin(), d.end());
}

std::vector<std::uint32_t> gaussian_kernel_fixed(const std::vector<double>& taps) {
  const int n = static_cast<int>(taps.size()), half = n / 2;
  std::vector<std::uint32_t> k(n);
  double err = 0;
  std::int64_t sum = 0;
  for (int i = 0; i < half; ++i) {
    const double adj = taps[i] * 256.0 + err;
    const std::int64_t v = std::llrint(adj);  // round half to even, as cvRound
    err = adj - static_cast<double>(v);
    k[i] = k[n - 1 - i] = static_cast<std::uint32_t>(v);
    sum += v;
  }
  k[half] = static_cast<std::uint32_t>(256 - 2 * sum);
  return k;
}

BlurPlan plan_gaussian_blur(const BlurArgs& a, DType dtype, std::int64_t h, std::int64_t w) {
  GF_CHECK_ARG(std::isfinite(a.sigma) && a.sigma > 0,
               "gaussian_blur: sigma={} is invalid: expected a finite number > 0", a.sigma);
  GF_CHECK_ARG(std::isfinite(a.sigma_y), "gaussian_blur: sigma_y={} is invalid: expected a finite number > 0 or None",
               a.sigma_y);
  const double sx = a.sigma, sy = a.sigma_y > 0 ? a.sigma_y : a.sigma;
  auto check_size = [](int k, const char* name) {
    GF_CHECK_ARG(k == 0 || (k > 0 && k % 2 == 1 && k <= 32767),
                 "gaussian_blur: {}={} is invalid: expected a positive odd integer (at most 32767), or 0 to derive "
                 "it from sigma",
                 name, k);
  };
  check_size(a.ksize_x, "ksize (width)");
  check_size(a.ksize_y, "ksize (height)");
  const double per_side = dtype == DType::U8 ? 3.0 : 4.0;
  auto from_sigma = [&](double s) {
    const double v = s * per_side * 2 + 1;
    GF_CHECK_ARG(v < 32767, "gaussian_blur: sigma={} gives a kernel larger than 32767 taps", s);
    return static_cast<int>(std::lrint(v)) | 1;
  };
  int kx = a.ksize_x > 0 ? a.ksize_x : from_sigma(sx);
  int ky = a.ksize_y > 0 ? a.ksize_y : from_sigma(sy);
  if (a.border != Border::Constant) {
    if (h == 1) ky = 1;
    if (w == 1) kx = 1;
  }
  BlurPlan p;
  p.border = a.border;
  const std::vector<double> dx = gaussian_kernel_f64(kx, sx);
  const std::vector<double> dy = (ky == kx && sx == sy) ? dx : gaussian_kernel_f64(ky, sy);
  p.kx.assign(dx.begin(), dx.end());
  p.ky.assign(dy.begin(), dy.end());
  if (dtype == DType::U8) {
    p.kx_u8 = gaussian_kernel_fixed(dx);
    p.ky_u8 = gaussian_kernel_fixed(dy);
  }
  return p;
}

void gaussian_blur(const ArrayRef& in, const ArrayRef& out, const BlurArgs& args) {
  const Batch b = as_batch(in, "gaussian_blur(x)");
  GF_CHECK_ARG(in.dtype == DType::F32 || in.dtype == DType::U8,
               "gaussian_blur: unsupported {}: expected float32 or uint8", in.describe());
  GF_ASSERT(out.dtype == in.dtype && out.shape == in.shape && out.device == in.device, "output {} for input {}",
            out.describe(), in.describe());
  const BlurPlan plan = plan_gaussian_blur(args, in.dtype, b.h, b.w);
  if (in.device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    gaussian_blur_cuda(in, out, plan);
    return;
#else
    throw_no_cuda("gaussian_blur");
#endif
  }
  gaussian_blur_cpu(in, out, plan);
}

std::vector<double> blur_adjoint_weights(const std::vector<float>& taps, std::int64_t n, Border border) {
  std::vector<double> wts(n, 0.0);
  const std::int64_t r = static_cast<std::int64_t>(taps.size()) / 2;
  for (std::int64_t x = 0; x < n; ++x) {
    for (std::int64_t j = 0; j < static_cast<std::int64_t>(taps.size()); ++j) {
      const std::int64_t s = border_index(x + j - r, n, border);
      if (s >= 0) wts[s] += taps[j];
    }
  }
  return wts;
}

}  // namespace gpufleet::kernels
