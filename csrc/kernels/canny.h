#pragma once
/// canny: the output of cv2.Canny(img, low, high, apertureSize=3, L2gradient) bit for bit, on uint8
/// images or batches, on the CPU (canny_cpu.cpp) or CUDA (canny_cuda.cu).
///
/// Note [Canny rules] (OpenCV 4.x, modules/imgproc/src/canny.cpp):
/// - 3x3 Sobel dx, dy in int16 with BORDER_REPLICATE; magnitude |dx|+|dy| (L1) or dx^2+dy^2 (L2).
/// - Thresholds swapped if low > high; for L2 each is clamped to 32767 and squared; then floored.
///   A pixel is a candidate when m > low and strong when m > high (both strict).
/// - Non-maximum suppression with TG22 = 13573 and y = |dy| << 15: y < |dx|*TG22 is horizontal
///   (m > left && m >= right); y > |dx|*TG22 + (|dx| << 16) is vertical (m > up && m >= down);
///   otherwise diagonal, strict on both sides, along (-s, +s) with s = sign(dx ^ dy). Magnitudes
///   outside the image are 0, so border pixels can be edges.
/// - Hysteresis: every candidate 8-connected (through candidates) to a strong pixel is an edge;
///   output 255 for edges, 0 elsewhere.
#include <cstdint>

#include "kernels/array.h"

namespace gpufleet::kernels {

struct CannyArgs {
  double low = 0, high = 0;
  bool l2gradient = false;
};

/// The integer thresholds OpenCV compares with (after swapping, squaring for L2, flooring).
struct CannyThresholds {
  std::int64_t low = 0, high = 0;
};
CannyThresholds canny_thresholds(const CannyArgs& args);

/// Edges of `in` (uint8 (H, W) or (N, H, W), CPU or CUDA) into `out` (uint8, same shape and device).
void canny(const ArrayRef& in, const ArrayRef& out, const CannyArgs& args);

// Backends (trust their inputs).
void canny_cpu(const ArrayRef& in, const ArrayRef& out, const CannyThresholds& t, bool l2);
#if GPUFLEET_WITH_CUDA
void canny_cuda(const ArrayRef& in, const ArrayRef& out, const CannyThresholds& t, bool l2);
#endif

}  // namespace gpufleet::kernels
