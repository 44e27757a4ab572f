#pragma once
/// kmeans1d: k-means on scalar values (pixel intensities, depths), per image or over a whole array.
///
/// Note [Exact 1-D k-means]: in one dimension an optimal partition consists of contiguous runs of the
/// sorted values, so dynamic programming finds the global optimum (Wang & Song 2011, Ckmeans.1d.dp):
/// D[m][j] = min_i D[m-1][i-1] + cost(i, j) over sorted, de-duplicated, weighted values, with the
/// argmin monotone in j (divide and conquer, O(k n log n)). uint8 data collapses to its 256-bin
/// histogram, so every pixel is used and no sampling is needed. Labels are numbered by increasing
/// centre; each value gets the nearest centre (ties to the lower label).
///
/// Fewer distinct values d than k: d clusters (one per distinct value, inertia 0); the centres past d
/// are NaN. Constant input is the case d = 1 (all labels 0).
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/array.h"

namespace gpufleet::kernels {

enum class KMeansMethod { Exact, Lloyd };

struct KMeansArgs {
  int k = 4;
  KMeansMethod method = KMeansMethod::Exact;
  double sample = 0;                  ///< fraction of the values used to fit, in (0, 1]; 0 means all
  std::optional<std::uint64_t> seed;  ///< for sampling and k-means++; none draws a fresh seed
  int n_init = 10;                    ///< Lloyd restarts
  int max_iter = 300;                 ///< Lloyd iterations per restart
  double tol = 1e-4;                  ///< Lloyd: stop when the centres move less than tol * variance
};

/// Outputs: labels int32 with the values' shape; centres float64 (P, k); inertia float64 (P);
/// clusters int32 (P): the number of clusters found (min(k, distinct values)). P is the number of
/// problems: N for a batch of images (N, H, W) with per_image, else 1.
struct KMeansOut {
  ArrayRef labels, centres, inertia, clusters;
};

/// Checks the arguments and the values (uint8, float32 or float64; finite; non-empty).
void check_kmeans(const ArrayRef& values, const KMeansArgs& args);

void kmeans1d(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& args, bool per_image);

/// One problem on the CPU: fits on (a sample of) `values[0..n)` and labels all of them. Returns the
/// number of clusters; writes `centres[0..k)` (NaN past the count) and `*inertia` (over all n values).
template <class T>
int kmeans1d_cpu_one(const T* values, std::int64_t n, const KMeansArgs& args, std::uint64_t seed, std::int32_t* labels,
                     double* centres, double* inertia);

/// Exact optimum for weighted sorted distinct values x (ascending) into k <= x.size() clusters; returns
/// the centres (ascending). Exposed for tests.
std::vector<double> kmeans1d_exact_weighted(const std::vector<double>& x, const std::vector<double>& w, int k);

void kmeans1d_cpu(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& args, bool per_image);
#if GPUFLEET_WITH_CUDA
void kmeans1d_cuda(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& args, bool per_image);
#endif

/// The centres -> label lookup table for uint8 values (nearest centre, ties to the lower label).
void kmeans_label_lut(const double* centres, int clusters, std::int32_t lut[256]);

}  // namespace gpufleet::kernels
