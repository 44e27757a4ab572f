#pragma once
/// congestion_score: the seed-003 postprocess as one call per image or batch:
/// exact k-means (k clusters) of the depth values -> label map -> min-max to uint8 -> canny ->
/// Gaussian blur (ksize, sigma, replicated borders) -> mean.
///
/// Note [Fast congestion score]: the blur is linear, so mean(blur(E)) = sum_{y,x} E[y,x] a[y] b[x] / (H W)
/// with a, b the blur's adjoint weights along columns and rows (blur_adjoint_weights). The fast mode
/// sums these weights over the edge pixels and never builds the blurred map; the faithful mode blurs
/// as the seed does and averages in double. They agree to about 1e-7 relative (float32 rounding of the
/// blurred map).
///
/// Labels follow the exact k-means (numbered by increasing centre). The seed's labels are numbered in
/// scikit-learn's k-means++ selection order, which changes with its unseeded 5 % sample, so the seed's
/// normalised label image (and with it the Canny edges and the score) changes from run to run.
#include <cstdint>

#include "kernels/array.h"

namespace gpufleet::kernels {

struct CongestionArgs {
  int k = 4;
  double low = 100, high = 200;
  int ksize = 71;
  double sigma = 7;
  bool fast = true;
};

/// scores: float64 (N). Optional intermediates (data == nullptr when not wanted): labels int32
/// (N, H, W), centres float64 (N, k), normalized uint8 (N, H, W), edges uint8 (N, H, W), blurred
/// float32 (N, H, W; faithful mode only).
struct CongestionOut {
  ArrayRef scores, labels, centres, normalized, edges, blurred;
};

/// Checks the arguments (ValueError naming the bad one); depth uint8 or float32, (H, W) or (N, H, W).
void check_congestion(const ArrayRef& depth, const CongestionArgs& args);

void congestion_score(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& args);

void congestion_score_cpu(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& args);
#if GPUFLEET_WITH_CUDA
void congestion_score_cuda(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& args);
#endif

/// The uint8 value the seed's min-max step gives label `l` when the labels present span [lmin, lmax].
std::uint8_t normalized_label(int l, int lmin, int lmax);

}  // namespace gpufleet::kernels
