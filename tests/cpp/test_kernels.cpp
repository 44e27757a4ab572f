// The kernels' C++ core: thread pool, taps, border rules, exact k-means, the fast congestion identity,
// and the CPU kernels' invariants (the references live in tests/python/test_kernels.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/array.h"
#include "kernels/canny.h"
#include "kernels/congestion.h"
#include "kernels/device_memory.h"
#include "kernels/gaussian_blur.h"
#include "kernels/kmeans1d.h"
#include "kernels/launch_shape.h"
#include "kernels/parallel.h"
#include "kernels/reduce.h"

using namespace gpufleet;
using namespace gpufleet::kernels;

namespace {

template <class T>
ArrayRef view(std::vector<T>& v, std::vector<std::int64_t> shape, DType t) {
  return ArrayRef{v.data(), t, std::move(shape), Device::cpu(), 0};
}

}  // namespace

TEST(KernelsParallel, CoversEveryIndexOnceAndPropagatesErrors) {
  for (int threads : {1, 2, 5}) {
    set_num_threads(threads);
    for (std::int64_t n : {0, 1, 7, 1000, 100003}) {
      std::vector<std::atomic<int>> hits(n);
      parallel_for(n, 3, [&](std::int64_t b, std::int64_t e) {
        for (auto i = b; i < e; ++i) hits[i]++;
        // nested calls run serially and still cover their range
        std::atomic<int> inner{0};
        parallel_for(4, 1, [&](std::int64_t b2, std::int64_t e2) { inner += static_cast<int>(e2 - b2); });
        EXPECT_EQ(inner.load(), 4);
      });
      for (auto& h : hits) ASSERT_EQ(h.load(), 1);
    }
    EXPECT_THROW(parallel_for(100, 1, [](std::int64_t, std::int64_t e) {
                   if (e > 50) throw std::runtime_error("boom");
                 }),
                 std::runtime_error);
  }
  set_num_threads(0);
  EXPECT_GE(num_threads(), 1);
  EXPECT_THROW(set_num_threads(-2), std::invalid_argument);
}

TEST(KernelsBlur, TapsAndSizeRules) {
  const auto k = gaussian_kernel(71, 7.0);
  ASSERT_EQ(k.size(), 71u);
  EXPECT_NEAR(std::accumulate(k.begin(), k.end(), 0.0), 1.0, 1e-6);
  for (int i = 0; i < 71; ++i) EXPECT_EQ(k[i], k[70 - i]);
  const auto fixed = gaussian_kernel_fixed(gaussian_kernel_f64(71, 7.0));
  EXPECT_EQ(std::accumulate(fixed.begin(), fixed.end(), 0u), 256u);
  BlurArgs a;
  a.sigma = 2.0;
  EXPECT_EQ(plan_gaussian_blur(a, DType::F32, 50, 50).kx.size(), 17u);  // round(2*4*2+1)|1
  EXPECT_EQ(plan_gaussian_blur(a, DType::U8, 50, 50).kx.size(), 13u);   // round(2*3*2+1)|1
  a.ksize_x = a.ksize_y = 9;
  EXPECT_EQ(plan_gaussian_blur(a, DType::F32, 1, 50).ky.size(), 1u);
  a.border = Border::Constant;
  EXPECT_EQ(plan_gaussian_blur(a, DType::F32, 1, 50).ky.size(), 9u);
  a.ksize_x = 8;
  EXPECT_THROW(plan_gaussian_blur(a, DType::F32, 5, 5), std::invalid_argument);
  EXPECT_THROW(parse_border("wrap"), std::invalid_argument);
}

TEST(KernelsBlur, BorderIndexFollowsOpenCV) {
  // reflect101: gfedcb|abcdefgh|gfedcba
  EXPECT_EQ(border_index(-1, 8, Border::Reflect101), 1);
  EXPECT_EQ(border_index(8, 8, Border::Reflect101), 6);
  EXPECT_EQ(border_index(-20, 3, Border::Reflect101), 0);  // several reflections
  EXPECT_EQ(border_index(-5, 1, Border::Reflect101), 0);
  EXPECT_EQ(border_index(-5, 8, Border::Replicate), 0);
  EXPECT_EQ(border_index(12, 8, Border::Replicate), 7);
  EXPECT_EQ(border_index(-1, 8, Border::Constant), -1);
}

TEST(KernelsBlur, AdjointWeightsGiveTheMeanOfTheBlur) {
  // Note [Fast congestion score]: mean(blur(E)) == sum E a b / HW, for every border.
  std::mt19937 gen(42);
  for (Border border : {Border::Replicate, Border::Reflect101, Border::Constant}) {
    const std::int64_t h = 23, w = 37;
    std::vector<float> e(h * w), out(h * w);
    for (auto& v : e) v = (gen() % 5 == 0) ? 255.f : 0.f;
    BlurArgs args;
    args.ksize_x = args.ksize_y = 15;
    args.sigma = 3;
    args.border = border;
    gaussian_blur(view(e, {h, w}, DType::F32), view(out, {h, w}, DType::F32), args);
    double direct = 0;
    for (float v : out) direct += v;
    const BlurPlan p = plan_gaussian_blur(args, DType::F32, h, w);
    const auto a = blur_adjoint_weights(p.ky, h, border), b = blur_adjoint_weights(p.kx, w, border);
    double fast = 0;
    for (std::int64_t y = 0; y < h; ++y)
      for (std::int64_t x = 0; x < w; ++x) fast += e[y * w + x] * a[y] * b[x];
    EXPECT_NEAR(fast / direct, 1.0, 1e-6) << border_name(border);
  }
}

TEST(KernelsCanny, ThresholdRules) {
  EXPECT_EQ(canny_thresholds({100.7, 200.2, false}).low, 100);
  EXPECT_EQ(canny_thresholds({300, 200, false}).low, 200);  // swapped
  EXPECT_EQ(canny_thresholds({300, 200, false}).high, 300);
  EXPECT_EQ(canny_thresholds({10.5, 20, true}).low, 110);  // floor(10.5^2)
  EXPECT_THROW(canny_thresholds({NAN, 1, false}), std::invalid_argument);
}

TEST(KernelsCanny, StepEdgesAndBorders) {
  // A vertical step: equal magnitudes in two columns; OpenCV keeps the left one.
  const std::int64_t h = 9, w = 12;
  std::vector<std::uint8_t> img(h * w), out(h * w);
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) img[y * w + x] = x < 6 ? 0 : 200;
  canny(view(img, {h, w}, DType::U8), view(out, {h, w}, DType::U8), {100, 200, false});
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) EXPECT_EQ(out[y * w + x], x == 5 ? 255 : 0) << y << "," << x;
  std::vector<float> f(h * w);
  EXPECT_THROW(canny(view(f, {h, w}, DType::F32), view(out, {h, w}, DType::U8), {1, 2, false}), std::invalid_argument);
}

namespace {

// Note [Canny rules] written out directly, one pixel at a time, as the reference for the banded SIMD
// implementation (the Python tests compare with OpenCV itself; this one also runs under ASan).
std::vector<std::uint8_t> canny_reference(const std::uint8_t* img, std::int64_t h, std::int64_t w,
                                          const CannyThresholds& t, bool l2) {
  auto px = [&](std::int64_t y, std::int64_t x) {
    return static_cast<int>(img[std::clamp<std::int64_t>(y, 0, h - 1) * w + std::clamp<std::int64_t>(x, 0, w - 1)]);
  };
  std::vector<int> dx(h * w), dy(h * w), mag(h * w);
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) {
      const int gx = px(y - 1, x + 1) + 2 * px(y, x + 1) + px(y + 1, x + 1) - px(y - 1, x - 1) - 2 * px(y, x - 1) -
                     px(y + 1, x - 1);
      const int gy = px(y + 1, x - 1) + 2 * px(y + 1, x) + px(y + 1, x + 1) - px(y - 1, x - 1) - 2 * px(y - 1, x) -
                     px(y - 1, x + 1);
      dx[y * w + x] = gx;
      dy[y * w + x] = gy;
      mag[y * w + x] = l2 ? gx * gx + gy * gy : std::abs(gx) + std::abs(gy);
    }
  auto m = [&](std::int64_t y, std::int64_t x) {
    return y < 0 || y >= h || x < 0 || x >= w ? 0 : mag[y * w + x];
  };
  std::vector<std::uint8_t> state(h * w, 0);
  std::vector<std::int64_t> work;
  for (std::int64_t y = 0; y < h; ++y)
    for (std::int64_t x = 0; x < w; ++x) {
      const int v = m(y, x);
      if (v <= t.low) continue;
      const std::int64_t ax = std::abs(dx[y * w + x]), ay = std::int64_t{std::abs(dy[y * w + x])} << 15;
      const std::int64_t tg22 = ax * 13573, tg67 = tg22 + (ax << 16);
      bool keep;
      if (ay < tg22) {
        keep = v > m(y, x - 1) && v >= m(y, x + 1);
      } else if (ay > tg67) {
        keep = v > m(y - 1, x) && v >= m(y + 1, x);
      } else {
        const int s = (dx[y * w + x] < 0) != (dy[y * w + x] < 0) ? -1 : 1;
        keep = v > m(y - 1, x - s) && v > m(y + 1, x + s);
      }
      if (!keep) continue;
      state[y * w + x] = v > t.high ? 2 : 1;
      if (v > t.high) work.push_back(y * w + x);
    }
  while (!work.empty()) {
    const std::int64_t p = work.back();
    work.pop_back();
    for (std::int64_t yy = p / w - 1; yy <= p / w + 1; ++yy)
      for (std::int64_t xx = p % w - 1; xx <= p % w + 1; ++xx)
        if (yy >= 0 && yy < h && xx >= 0 && xx < w && state[yy * w + xx] == 1) {
          state[yy * w + xx] = 2;
          work.push_back(yy * w + xx);
        }
  }
  std::vector<std::uint8_t> out(h * w);
  for (std::int64_t i = 0; i < h * w; ++i) out[i] = state[i] == 2 ? 255 : 0;
  return out;
}

}  // namespace

TEST(KernelsCanny, MatchesTheRulesAcrossBandsBatchesAndWidths) {
  // Smoothed noise (long weak chains), widths around the 16-pixel groups, and heights spanning many
  // row bands (65536 / w + 1 rows each).
  std::mt19937 gen(11);
  for (int threads : {1, 3}) {
    set_num_threads(threads);
    for (auto [n, h, w] : std::vector<std::array<std::int64_t, 3>>{
             {1, 1, 1}, {1, 2, 17}, {2, 33, 15}, {1, 700, 16}, {3, 400, 233}, {1, 260, 1025}, {2, 150, 4099}}) {
      std::vector<std::uint8_t> img(n * h * w), out(n * h * w);
      std::vector<float> raw(n * h * w);
      for (auto& v : raw) v = static_cast<float>(gen() % 256);
      // a 5x5 box smoothing keeps the structure of real images (mostly sub-threshold, long edges)
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t y = 0; y < h; ++y)
          for (std::int64_t x = 0; x < w; ++x) {
            float s = 0;
            int c = 0;
            for (std::int64_t yy = std::max<std::int64_t>(0, y - 2); yy <= std::min(h - 1, y + 2); ++yy)
              for (std::int64_t xx = std::max<std::int64_t>(0, x - 2); xx <= std::min(w - 1, x + 2); ++xx, ++c)
                s += raw[(i * h + yy) * w + xx];
            img[(i * h + y) * w + x] = static_cast<std::uint8_t>(s / c);
          }
      for (bool l2 : {false, true})
        for (auto [lo, hi] : std::vector<std::array<double, 2>>{{10, 30}, {40, 80}, {0, 1}}) {
          const CannyArgs a{lo, hi, l2};
          canny(view(img, {n, h, w}, DType::U8), view(out, {n, h, w}, DType::U8), a);
          for (std::int64_t i = 0; i < n; ++i) {
            const auto ref = canny_reference(img.data() + i * h * w, h, w, canny_thresholds(a), l2);
            ASSERT_TRUE(std::equal(ref.begin(), ref.end(), out.begin() + i * h * w))
                << n << "x" << h << "x" << w << " image " << i << " thresholds " << lo << "," << hi << " l2 " << l2
                << " threads " << threads;
          }
        }
    }
  }
  set_num_threads(0);
}

TEST(KernelsKMeans, ExactMatchesBruteForce) {
  std::mt19937 gen(7);
  for (int trial = 0; trial < 30; ++trial) {
    const int n = 1 + static_cast<int>(gen() % 9);
    std::vector<double> x, w;
    double v = 0;
    for (int i = 0; i < n; ++i) {
      v += 0.5 + (gen() % 100) / 10.0;
      x.push_back(v);
      w.push_back(1 + gen() % 4);
    }
    for (int k = 1; k <= 4; ++k) {
      const auto c = kmeans1d_exact_weighted(x, w, k);
      auto cost_of = [&](const std::vector<int>& bounds) {  // bounds: start index of each run
        double total = 0;
        for (std::size_t r = 0; r < bounds.size(); ++r) {
          const int b = bounds[r], e = r + 1 < bounds.size() ? bounds[r + 1] : n;
          double sw = 0, sx = 0;
          for (int i = b; i < e; ++i) sw += w[i], sx += w[i] * x[i];
          for (int i = b; i < e; ++i) total += w[i] * (x[i] - sx / sw) * (x[i] - sx / sw);
        }
        return total;
      };
      const int kk = std::min(k, n);
      double best = INFINITY;
      for (unsigned mask = 0; mask < (1u << (n - 1)); ++mask) {
        if (__builtin_popcount(mask) != kk - 1) continue;
        std::vector<int> bounds{0};
        for (int i = 1; i < n; ++i)
          if (mask & (1u << (i - 1))) bounds.push_back(i);
        best = std::min(best, cost_of(bounds));
      }
      double ours = 0;
      for (int i = 0; i < n; ++i) {
        double d = INFINITY;
        for (double cc : c) d = std::min(d, (x[i] - cc) * (x[i] - cc));
        ours += w[i] * d;
      }
      EXPECT_NEAR(ours, best, 1e-9 * (1 + best)) << "n=" << n << " k=" << k;
      EXPECT_TRUE(std::is_sorted(c.begin(), c.end()));
    }
  }
}

TEST(KernelsKMeans, LabelTableTiesGoLow) {
  const double centres[] = {10, 20};
  std::int32_t lut[256];
  kmeans_label_lut(centres, 2, lut);
  EXPECT_EQ(lut[15], 0);
  EXPECT_EQ(lut[16], 1);
  EXPECT_EQ(lut[0], 0);
  EXPECT_EQ(lut[255], 1);
}

TEST(KernelsReduce, MeanAndMinMax) {
  std::vector<float> x(3 * 1001);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 1001);
  std::vector<double> m(3);
  mean(view(x, {3, 1001}, DType::F32), view(m, {3}, DType::F64), 3);
  for (double v : m) EXPECT_DOUBLE_EQ(v, 500.0);
  std::vector<std::uint8_t> u(x.size());
  normalize_minmax(view(x, {3, 1001}, DType::F32), view(u, {3, 1001}, DType::U8), 3);
  EXPECT_EQ(u[0], 0);
  EXPECT_EQ(u[1000], 255);
  EXPECT_EQ(normalized_label(1, 0, 3), 85);
  EXPECT_EQ(normalized_label(2, 0, 2), 255);
}

TEST(KernelsCongestion, FastEqualsFaithful) {
  const std::int64_t n = 2, h = 40, w = 57;
  std::vector<std::uint8_t> depth(n * h * w);
  for (std::int64_t i = 0; i < n * h * w; ++i) depth[i] = static_cast<std::uint8_t>((i * 7919 / 97) % 256 / 60 * 60);
  std::vector<double> fast(n), faithful(n);
  CongestionArgs args;
  CongestionOut out;
  out.scores = view(fast, {n}, DType::F64);
  congestion_score(view(depth, {n, h, w}, DType::U8), out, args);
  args.fast = false;
  out.scores = view(faithful, {n}, DType::F64);
  congestion_score(view(depth, {n, h, w}, DType::U8), out, args);
  for (int i = 0; i < n; ++i) {
    EXPECT_GT(fast[i], 0);
    EXPECT_NEAR(fast[i] / faithful[i], 1.0, 1e-6);
  }
#if !GPUFLEET_WITH_CUDA
  ArrayRef on_gpu = view(depth, {n, h, w}, DType::U8);
  on_gpu.device = Device::cuda(0);
  EXPECT_THROW(congestion_score(on_gpu, out, args), std::invalid_argument);
#endif
}

// ---- CUDA launch shapes and memory backend (host arithmetic: runs without a GPU) ---------------------

namespace {

bool within_limits(const Launch& l) {
  return l.grid.x >= 1 && l.grid.y >= 1 && l.grid.z >= 1 && l.grid.x <= kMaxGridX && l.grid.y <= kMaxGridYZ &&
         l.grid.z <= kMaxGridYZ && l.block.x * l.block.y * l.block.z <= 1024 && l.shared <= kMaxShared;
}

// The kernels' grid-stride loop `for (b = blockIdx; b < count; b += gridDim)`, run for every block:
// each of `count` items must be visited exactly once.
void expect_stride_covers(std::int64_t count, unsigned grid, const char* what) {
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(count), 0);
  for (std::int64_t block = 0; block < grid; ++block)
    for (std::int64_t b = block; b < count; b += grid) ++seen[static_cast<std::size_t>(b)];
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](std::uint8_t v) { return v == 1; }))
      << what << ": " << count << " items over a grid of " << grid;
}

}  // namespace

TEST(KernelsLaunchShape, BatchesPastTheGridLimitsAreCoveredByGridStrideLoops) {
  // Issue 17 item 3: the CUDA blur refused n*h > 262,140 rows (65,535 row groups of 4), canny,
  // k-means and the score more than 65,535 images, mean/normalize_minmax more than 65,535 groups.
  const std::int64_t rows_past_cap = 64LL * 4100;  // 262,400 rows
  const Launch rows = blur_rows_launch(rows_past_cap, 16, 35);
  EXPECT_TRUE(within_limits(rows));
  EXPECT_EQ(rows.grid.y, 65535u);
  expect_stride_covers(ceil_div(rows_past_cap, kRowThreadsY), rows.grid.y, "blur row groups");
  EXPECT_TRUE(within_limits(blur_rows_launch(256LL * 1080, 1920, 35)));
  EXPECT_TRUE(within_limits(blur_rows_launch(1, 1, 1100))) << "the largest radius still tiles in shared memory";

  const std::int64_t images = 65543;
  for (int r : {0, 35, 1100}) {  // tiled and direct column passes
    const Launch cols = blur_cols_launch(images, 4, 5, r);
    EXPECT_TRUE(within_limits(cols)) << "radius " << r;
    expect_stride_covers(images, cols.grid.z, "blur column images");
  }
  EXPECT_FALSE(blur_cols_use_tile(1100));
  EXPECT_TRUE(blur_cols_use_tile(35));

  const Launch canny = canny_classify_launch(images, 4, 5);
  EXPECT_TRUE(within_limits(canny));
  expect_stride_covers(images, canny.grid.z, "canny images");
  const Launch tall = canny_classify_launch(1, 600000, 3);  // 75,000 tile rows
  EXPECT_TRUE(within_limits(tall));
  expect_stride_covers(ceil_div(600000, kCannyTY), tall.grid.y, "canny tile rows");

  // mean over 100,000 groups of 64 values: one block per group and step, 65,535 groups per step.
  const Launch mean = per_group_launch(100000, 64);
  EXPECT_TRUE(within_limits(mean));
  EXPECT_EQ(mean.grid.x, 1u);
  expect_stride_covers(100000, mean.grid.y, "mean groups");
  // Partial results are indexed g * grid.x + blockIdx.x: inside the groups * grid.x scratch.
  const Launch big = per_group_launch(3, 1 << 24);
  EXPECT_EQ(big.grid.x, static_cast<unsigned>(kBlocksPerGroup));
  EXPECT_LT((3 - 1) * std::int64_t{big.grid.x} + (big.grid.x - 1), 3 * std::int64_t{big.grid.x});
  expect_stride_covers(1 << 24, big.grid.x * big.block.x, "values of one group");
  const Launch flat = flat_launch(std::int64_t{1} << 33);
  EXPECT_TRUE(within_limits(flat));
  EXPECT_EQ(grid_dim(0), 1u);  // never an empty grid
}

TEST(KernelsMemory, PoolFallbackChoice) {
  // Issue 17 item 11: cudaMallocAsync was used with no fallback for devices without memory pools.
  EXPECT_EQ(choose_memory_backend(true, nullptr), MemoryBackend::AsyncPool);
  EXPECT_EQ(choose_memory_backend(false, nullptr), MemoryBackend::Caching);
  EXPECT_EQ(choose_memory_backend(true, ""), MemoryBackend::AsyncPool);
  EXPECT_EQ(choose_memory_backend(false, "auto"), MemoryBackend::Caching);
  EXPECT_EQ(choose_memory_backend(true, "caching"), MemoryBackend::Caching);
  EXPECT_EQ(choose_memory_backend(true, "pool"), MemoryBackend::AsyncPool);
  try {
    choose_memory_backend(false, "pool");
    FAIL() << "a pool was chosen on a device without memory pools";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("cudaDevAttrMemoryPoolsSupported"), std::string::npos) << e.what();
  }
  try {
    choose_memory_backend(true, "Pool ");
    FAIL() << "a bad GPUFLEET_KERNELS_MEMORY was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'Pool '"), std::string::npos) << e.what();
  }
  EXPECT_STREQ(memory_backend_name(MemoryBackend::AsyncPool), "pool");
  EXPECT_STREQ(memory_backend_name(MemoryBackend::Caching), "caching");
  EXPECT_EQ(kPoolReleaseThreshold, ~std::uint64_t{0}) << "the pool keeps its memory across synchronisations";
}

