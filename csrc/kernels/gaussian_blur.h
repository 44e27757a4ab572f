#pragma once
/// gaussian_blur: OpenCV's GaussianBlur (separable, getGaussianKernel taps) on float32 and uint8
/// images or batches, on the CPU (gaussian_blur_cpu.cpp) or CUDA (gaussian_blur_cuda.cu).
#include <cstdint>
#include <string_view>
#include <vector>

#include "kernels/array.h"

namespace gpufleet::kernels {

enum class Border { Replicate, Reflect101, Constant };

/// Parses "replicate", "reflect101" (also "reflect_101", "default") or "constant".
Border parse_border(std::string_view name);
const char* border_name(Border b);

/// cv::getGaussianKernel(n, sigma, CV_32F) for sigma > 0: exp(-(i-(n-1)/2)^2 / (2 sigma^2)) normalised
/// to sum 1 in double, then rounded to float32.
std::vector<float> gaussian_kernel(int n, double sigma);
/// The same taps in double, before the float32 rounding (OpenCV's getGaussianKernelBitExact).
std::vector<double> gaussian_kernel_f64(int n, double sigma);

/// The user's request: ksize_x/ksize_y 0 (derive from sigma) or positive odd; sigma > 0; sigma_y <= 0
/// means "same as sigma".
struct BlurArgs {
  int ksize_x = 0, ksize_y = 0;
  double sigma = 0, sigma_y = 0;
  Border border = Border::Replicate;
};

/// OpenCV's bit-exact uint8 taps: the float taps in fixed point with 8 fraction bits by error
/// diffusion, the centre tap taking the remainder so the taps sum to exactly 256.
std::vector<std::uint32_t> gaussian_kernel_fixed(const std::vector<double>& taps);

/// The resolved filter for one image size: the taps in each direction (odd lengths, symmetric).
///
/// Note [uint8 blur is integer arithmetic]: cv2.GaussianBlur on uint8 runs OpenCV's bit-exact
/// fixed-point filter: the row pass sums u8 * tap8 exactly (8 fraction bits), the column pass sums
/// row * tap8 exactly (16 fraction bits), and the result is (sum + 2^15) >> 16. gaussian_blur does the
/// same integer arithmetic on both backends, so its uint8 output equals OpenCV's bit for bit.
struct BlurPlan {
  std::vector<float> kx, ky;                   ///< float32 taps (cv::getGaussianKernel(n, sigma, CV_32F))
  std::vector<std::uint32_t> kx_u8, ky_u8;     ///< uint8 inputs: fixed-point taps (sum 256)
  Border border = Border::Replicate;
};

/// Validates `args` (ValueError naming the bad value) and applies OpenCV's size rules for an
/// `h` x `w` image of `dtype`: ksize from sigma when 0 (round(sigma*{3 for uint8, 4 otherwise}*2+1)|1),
/// and a 1-tap kernel along a dimension of size 1 unless the border is constant.
BlurPlan plan_gaussian_blur(const BlurArgs& args, DType dtype, std::int64_t h, std::int64_t w);

/// Blurs `in` (float32 or uint8, (H, W) or (N, H, W), CPU or CUDA) into `out` (same dtype, shape and
/// device). uint8 results are rounded to nearest.
void gaussian_blur(const ArrayRef& in, const ArrayRef& out, const BlurArgs& args);

// Backends: trust their inputs (checked by gaussian_blur).
void gaussian_blur_cpu(const ArrayRef& in, const ArrayRef& out, const BlurPlan& plan);
#if GPUFLEET_WITH_CUDA
void gaussian_blur_cuda(const ArrayRef& in, const ArrayRef& out, const BlurPlan& plan);
#endif

/// Row/column weights of the blur's adjoint: b[s] = sum_x sum_j k[j] [border(x + j - r) == s], so that
/// mean(blur(E)) = sum_{y,x} E[y,x] a[y] b[x] / (H W) (Note [Fast congestion score] in congestion.h).
/// For the constant border the out-of-image taps contribute nothing.
std::vector<double> blur_adjoint_weights(const std::vector<float>& taps, std::int64_t n, Border border);

/// OpenCV's borderInterpolate for replicate and reflect101; -1 for constant outside the image.
inline std::int64_t border_index(std::int64_t i, std::int64_t n, Border b) {
  if (i >= 0 && i < n) return i;
  switch (b) {
    case Border::Replicate: return i < 0 ? 0 : n - 1;
    case Border::Constant: return -1;
    case Border::Reflect101:
      if (n == 1) return 0;
      do {
        if (i < 0) i = -i;
        if (i >= n) i = 2 * n - 2 - i;
      } while (i < 0 || i >= n);
      return i;
  }
  return 0;
}

}  // namespace gpufleet::kernels
