// congestion_score on the CPU, fused: for uint8 depth the k-means runs on the per-image histogram and
// one 256-entry table maps depth straight to the normalised label image; canny reuses the CPU pieces;
// the fast mode sums the blur's adjoint weights over the edges (Note [Fast congestion score]).
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/error.h"
#include "kernels/canny.h"
#include "kernels/canny_cpu.h"
#include "kernels/congestion.h"
#include "kernels/gaussian_blur.h"
#include "kernels/kmeans1d.h"
#include "kernels/parallel.h"
#include "kernels/reduce.h"

namespace gpufleet::kernels {

namespace {

constexpr std::int64_t kChunk = 1 << 16;

// Per image: the 256-entry depth -> normalised label table and the centres.
void fit_uint8(const ArrayRef& depth, const Batch& b, int k, std::vector<std::array<std::uint8_t, 256>>& norm_lut,
               std::vector<std::array<std::int32_t, 256>>& label_lut, double* centres) {
  const std::int64_t plane = b.plane(), per_image = (plane + kChunk - 1) / kChunk;
  std::vector<std::array<std::int64_t, 256>> part(b.n * per_image);
  const std::uint8_t* src = depth.ptr<const std::uint8_t>();
  parallel_for(b.n * per_image, 1, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t c = c0; c < c1; ++c) {
      const std::int64_t img = c / per_image, i0 = (c % per_image) * kChunk, i1 = std::min(plane, i0 + kChunk);
      // Four sub-histograms hide the store-to-load latency of repeated values.
      std::int64_t h[4][256] = {};
      const std::uint8_t* p = src + img * plane;
      std::int64_t i = i0;
      for (; i + 4 <= i1; i += 4) {
        ++h[0][p[i]];
        ++h[1][p[i + 1]];
        ++h[2][p[i + 2]];
        ++h[3][p[i + 3]];
      }
      for (; i < i1; ++i) ++h[0][p[i]];
      for (int v = 0; v < 256; ++v) part[c][v] = h[0][v] + h[1][v] + h[2][v] + h[3][v];
    }
  });
  norm_lut.resize(b.n);
  label_lut.resize(b.n);
  parallel_for(b.n, 1, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t img = i0; img < i1; ++img) {
      std::vector<double> x, w;
      for (int v = 0; v < 256; ++v) {
        std::int64_t count = 0;
        for (std::int64_t c = 0; c < per_image; ++c) count += part[img * per_image + c][v];
        if (count) {
          x.push_back(v);
          w.push_back(static_cast<double>(count));
        }
      }
      const std::vector<double> c = kmeans1d_exact_weighted(x, w, k);
      const int clusters = static_cast<int>(c.size());
      for (int i = 0; i < k; ++i) centres[img * k + i] = i < clusters ? c[i] : std::nan("");
      kmeans_label_lut(c.data(), clusters, label_lut[img].data());
      // Every cluster of the exact fit holds pixels, so the labels present are 0 .. clusters-1.
      for (int v = 0; v < 256; ++v) norm_lut[img][v] = normalized_label(label_lut[img][v], 0, clusters - 1);
    }
  });
}

}  // namespace

void congestion_score_cpu(const ArrayRef& depth, const CongestionOut& out, const CongestionArgs& a) {
  const Batch b = as_batch(depth, "congestion_score(depth)");
  const std::int64_t plane = b.plane(), rows = b.n * b.h;
  const std::int64_t row_grain = std::max<std::int64_t>(1, 65536 / b.w);

  std::vector<double> centres_tmp;
  double* centres = out.centres.data ? out.centres.ptr<double>() : (centres_tmp.resize(b.n * a.k), centres_tmp.data());
  std::vector<std::uint8_t> norm_tmp;
  std::uint8_t* norm = out.normalized.data ? out.normalized.ptr<std::uint8_t>()
                                           : (norm_tmp.resize(b.n * plane), norm_tmp.data());

  // 1. k-means and the normalised label image.
  if (depth.dtype == DType::U8) {
    std::vector<std::array<std::uint8_t, 256>> norm_lut;
    std::vector<std::array<std::int32_t, 256>> label_lut;
    fit_uint8(depth, b, a.k, norm_lut, label_lut, centres);
    const std::uint8_t* src = depth.ptr<const std::uint8_t>();
    std::int32_t* labels = out.labels.data ? out.labels.ptr<std::int32_t>() : nullptr;
    parallel_for(rows, row_grain, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const auto& lut = norm_lut[r / b.h];
        const std::uint8_t* s = src + r * b.w;
        std::uint8_t* d = norm + r * b.w;
        for (std::int64_t x = 0; x < b.w; ++x) d[x] = lut[s[x]];
        if (labels) {
          const auto& ll = label_lut[r / b.h];
          std::int32_t* l = labels + r * b.w;
          for (std::int64_t x = 0; x < b.w; ++x) l[x] = ll[s[x]];
        }
      }
    });
  } else {
    std::vector<std::int32_t> labels_tmp;
    std::int32_t* labels = out.labels.data ? out.labels.ptr<std::int32_t>()
                                           : (labels_tmp.resize(b.n * plane), labels_tmp.data());
    KMeansArgs km;
    km.k = a.k;
    std::vector<int> clusters(b.n);
    std::vector<double> inertia(b.n);
    parallel_for(b.n, 1, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t img = i0; img < i1; ++img) {
        if (depth.dtype == DType::F32)
          clusters[img] = kmeans1d_cpu_one(depth.ptr<const float>() + img * plane, plane, km, 0, labels + img * plane,
                                           centres + img * a.k, &inertia[img]);
        else
          clusters[img] = kmeans1d_cpu_one(depth.ptr<const double>() + img * plane, plane, km, 0,
                                           labels + img * plane, centres + img * a.k, &inertia[img]);
      }
    });
    parallel_for(rows, row_grain, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const int top = clusters[r / b.h] - 1;
        std::uint8_t lut[256];
        for (int l = 0; l <= top; ++l) lut[l] = normalized_label(l, 0, top);
        const std::int32_t* s = labels + r * b.w;
        std::uint8_t* d = norm + r * b.w;
        for (std::int64_t x = 0; x < b.w; ++x) d[x] = lut[s[x]];
      }
    });
  }

  // 2. canny: classification in row bands, hysteresis per image; `map` holds 0/1/2.
  std::vector<std::uint8_t> map_tmp;
  std::uint8_t* map = out.edges.data ? out.edges.ptr<std::uint8_t>() : (map_tmp.resize(b.n * plane), map_tmp.data());
  const CannyThresholds t = canny_thresholds({a.low, a.high, false});
  canny_map_cpu(norm, b.n, b.h, b.w, t, false, map);

  // 3. the score.
  BlurArgs blur;
  blur.ksize_x = blur.ksize_y = a.ksize;
  blur.sigma = a.sigma;
  const BlurPlan plan = plan_gaussian_blur(blur, DType::F32, b.h, b.w);
  double* scores = out.scores.ptr<double>();
  if (a.fast) {
    const std::vector<double> wy = blur_adjoint_weights(plan.ky, b.h, plan.border);
    const std::vector<double> wx = blur_adjoint_weights(plan.kx, b.w, plan.border);
    std::vector<double> row_sum(rows);
    const bool want_edges = out.edges.data != nullptr;
    parallel_for(rows, row_grain, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        std::uint8_t* m = map + r * b.w;
        double s = 0;
        for (std::int64_t x = 0; x < b.w; ++x) s += m[x] == 2 ? wx[x] : 0.0;
        row_sum[r] = s * wy[r % b.h];
        if (want_edges)
          for (std::int64_t x = 0; x < b.w; ++x) m[x] = m[x] == 2 ? 255 : 0;
      }
    });
    for (std::int64_t img = 0; img < b.n; ++img) {
      double s = 0;
      for (std::int64_t y = 0; y < b.h; ++y) s += row_sum[img * b.h + y];
      scores[img] = 255.0 * s / static_cast<double>(plane);
    }
  } else {
    std::vector<float> e(b.n * plane);
    parallel_for(rows, row_grain, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t i = r0 * b.w; i < r1 * b.w; ++i) {
        e[i] = map[i] == 2 ? 255.f : 0.f;
        map[i] = map[i] == 2 ? 255 : 0;
      }
    });
    std::vector<float> blurred_tmp;
    float* blurred = out.blurred.data ? out.blurred.ptr<float>() : (blurred_tmp.resize(b.n * plane), blurred_tmp.data());
    ArrayRef ein{e.data(), DType::F32, {b.n, b.h, b.w}, Device::cpu(), 0};
    ArrayRef bout{blurred, DType::F32, {b.n, b.h, b.w}, Device::cpu(), 0};
    gaussian_blur_cpu(ein, bout, plan);
    ArrayRef sout{scores, DType::F64, {b.n}, Device::cpu(), 0};
    mean_cpu(bout, sout, b.n);
  }
}

}  // namespace gpufleet::kernels
