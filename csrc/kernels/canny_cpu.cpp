// canny on the CPU (Note [Canny rules] in canny.h): Sobel, magnitude and non-maximum suppression in
// parallel row bands (three-row ring buffers), then 8-connected hysteresis from the strong pixels with
// an explicit stack, one image per task.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/canny.h"
#include "kernels/canny_cpu.h"
#include "kernels/parallel.h"
#include "kernels/simd.h"

namespace gpufleet::kernels {

namespace {

constexpr int kTg22 = 13573;  // round(tan(22.5 deg) * 2^15)

// Row y of dx, dy (as OpenCV's int16, held in int32) and the magnitude into mag[1..w]
// (mag[0] = mag[w+1] = 0).
GF_SIMD_CLONES
void sobel_row(const std::uint8_t* __restrict up, const std::uint8_t* __restrict cur, const std::uint8_t* __restrict dn,
               std::int64_t w, bool l2, int* __restrict s, int* __restrict d, int* __restrict dx, int* __restrict dy,
               int* __restrict mag) {
  for (std::int64_t x = 0; x < w; ++x) {
    s[x + 1] = up[x] + 2 * cur[x] + dn[x];
    d[x + 1] = dn[x] - up[x];
  }
  s[0] = s[1];
  s[w + 1] = s[w];
  d[0] = d[1];
  d[w + 1] = d[w];
  for (std::int64_t x = 0; x < w; ++x) {
    dx[x] = s[x + 2] - s[x];
    dy[x] = d[x] + 2 * d[x + 1] + d[x + 2];
  }
  if (l2) {
    for (std::int64_t x = 0; x < w; ++x) mag[x + 1] = dx[x] * dx[x] + dy[x] * dy[x];
  } else {
    for (std::int64_t x = 0; x < w; ++x) mag[x + 1] = std::abs(dx[x]) + std::abs(dy[x]);
  }
  mag[0] = 0;
  mag[w + 1] = 0;
}

// Non-maximum suppression of one row: 0 (not an edge), 1 (candidate), 2 (strong). Branch-free, eight
// lanes at a time (GCC vector extensions), then a scalar tail with the same rules.
GF_SIMD_CLONES
void nms_row(const int* mp, const int* mc, const int* mn, const int* dxr, const int* dyr, std::int64_t w, int low,
             int high, std::uint8_t* out) {
  typedef int V __attribute__((vector_size(32)));
  typedef int Vu __attribute__((vector_size(32), aligned(4), may_alias));
  typedef unsigned char B __attribute__((vector_size(8)));
  typedef unsigned char Bu __attribute__((vector_size(8), aligned(1), may_alias));
#define LD(p) (*reinterpret_cast<const Vu*>(p))
  std::int64_t x = 0;
  for (; x + 8 <= w; x += 8) {
    const V m = LD(mc + x + 1), xs = LD(dxr + x), ys = LD(dyr + x);
    const V ax = xs < 0 ? -xs : xs;
    const V ay = (ys < 0 ? -ys : ys) << 15;
    const V tg22x = ax * kTg22;
    const V tg67x = tg22x + (ax << 16);
    const V keep_h = (m > LD(mc + x)) & (m >= LD(mc + x + 2));
    const V keep_v = (m > LD(mp + x + 1)) & (m >= LD(mn + x + 1));
    const V keep_pos = (m > LD(mp + x)) & (m > LD(mn + x + 2));  // s = +1: up-left and down-right
    const V keep_neg = (m > LD(mp + x + 2)) & (m > LD(mn + x));  // s = -1: up-right and down-left
    const V keep_d = ((xs ^ ys) < 0) ? keep_neg : keep_pos;
    const V keep = (ay < tg22x) ? keep_h : ((ay > tg67x) ? keep_v : keep_d);
    const V cand = keep & (m > low);
    const V code = (cand & 1) + (cand & (m > high) & 1);
    *reinterpret_cast<Bu*>(out + x) = __builtin_convertvector(code, B);
  }
#undef LD
  for (; x < w; ++x) {
    const int m = mc[x + 1];
    const int xs = dxr[x], ys = dyr[x];
    const int ax = xs < 0 ? -xs : xs;
    const int ay = (ys < 0 ? -ys : ys) << 15;
    const int tg22x = ax * kTg22;
    const int tg67x = tg22x + (ax << 16);
    const int s = (xs ^ ys) < 0 ? -1 : 1;
    bool keep;
    if (ay < tg22x)
      keep = m > mc[x] && m >= mc[x + 2];
    else if (ay > tg67x)
      keep = m > mp[x + 1] && m >= mn[x + 1];
    else
      keep = m > mp[x + 1 - s] && m > mn[x + 1 + s];
    out[x] = static_cast<std::uint8_t>((m > low && keep) ? (m > high ? 2 : 1) : 0);
  }
}

}  // namespace

void canny_classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                         const CannyThresholds& t, bool l2, std::uint8_t* map, std::vector<std::int64_t>& strong) {
  const int low = static_cast<int>(t.low), high = static_cast<int>(t.high);
  std::vector<int> s(w + 2), d(w + 2);
  std::vector<int> mag(3 * (w + 2), 0);
  std::vector<int> gx(3 * w), gy(3 * w);
  auto row = [&](std::int64_t y) { return img + std::clamp<std::int64_t>(y, 0, h - 1) * w; };
  auto slot = [](std::int64_t y) { return static_cast<std::size_t>((y + 3) % 3); };
  auto compute = [&](std::int64_t y) {
    const std::size_t k = slot(y);
    if (y < 0 || y >= h) {
      std::fill(mag.begin() + k * (w + 2), mag.begin() + (k + 1) * (w + 2), 0);
      return;
    }
    sobel_row(row(y - 1), row(y), row(y + 1), w, l2, s.data(), d.data(), gx.data() + k * w, gy.data() + k * w,
              mag.data() + k * (w + 2));
  };
  compute(y0 - 1);
  compute(y0);
  for (std::int64_t y = y0; y < y1; ++y) {
    compute(y + 1);
    const std::size_t kp = slot(y - 1), kc = slot(y), kn = slot(y + 1);
    nms_row(mag.data() + kp * (w + 2), mag.data() + kc * (w + 2), mag.data() + kn * (w + 2), gx.data() + kc * w,
            gy.data() + kc * w, w, low, high, map + y * w);
    // Collect the strong pixels, skipping eight bytes at a time where there are none.
    const std::uint8_t* m = map + y * w;
    std::int64_t x = 0;
    for (; x + 8 <= w; x += 8) {
      std::uint64_t v;
      std::memcpy(&v, m + x, 8);
      if (!(v & 0x0202020202020202ULL)) continue;  // codes are 0, 1, 2: bit 1 marks a strong pixel
      for (int i = 0; i < 8; ++i)
        if (m[x + i] == 2) strong.push_back(y * w + x + i);
    }
    for (; x < w; ++x)
      if (m[x] == 2) strong.push_back(y * w + x);
  }
}

void canny_hysteresis(std::uint8_t* map, std::int64_t h, std::int64_t w,
                      const std::vector<const std::vector<std::int64_t>*>& seeds) {
  std::vector<std::int64_t> stack;
  auto visit = [&](std::int64_t p) {
    const std::int64_t y = p / w, x = p % w;
    const std::int64_t xl = x > 0 ? x - 1 : 0, xr = x + 1 < w ? x + 1 : w - 1;
    const std::int64_t yl = y > 0 ? y - 1 : 0, yr = y + 1 < h ? y + 1 : h - 1;
    for (std::int64_t yy = yl; yy <= yr; ++yy) {
      std::uint8_t* m = map + yy * w;
      for (std::int64_t xx = xl; xx <= xr; ++xx) {
        if (m[xx] == 1) {
          m[xx] = 2;
          stack.push_back(yy * w + xx);
        }
      }
    }
  };
  for (const auto* list : seeds) {
    for (std::int64_t p : *list) {
      visit(p);
      while (!stack.empty()) {
        const std::int64_t q = stack.back();
        stack.pop_back();
        visit(q);
      }
    }
  }
}

void canny_map_cpu(const std::uint8_t* src, std::int64_t n, std::int64_t h, std::int64_t w, const CannyThresholds& t,
                   bool l2, std::uint8_t* map) {
  const std::int64_t plane = h * w;
  const std::int64_t band = std::max<std::int64_t>(8, std::min<std::int64_t>(h, 65536 / w + 1));
  const std::int64_t bands = (h + band - 1) / band;
  std::vector<std::vector<std::int64_t>> strong(n * bands);
  parallel_for(n * bands, 1, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t img = task / bands, y0 = (task % bands) * band;
      canny_classify_band(src + img * plane, h, w, y0, std::min(h, y0 + band), t, l2, map + img * plane, strong[task]);
    }
  });
  parallel_for(n, 1, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t img = i0; img < i1; ++img) {
      std::vector<const std::vector<std::int64_t>*> seeds;
      for (std::int64_t b = 0; b < bands; ++b) seeds.push_back(&strong[img * bands + b]);
      canny_hysteresis(map + img * plane, h, w, seeds);
    }
  });
}

void canny_cpu(const ArrayRef& in, const ArrayRef& out, const CannyThresholds& t, bool l2) {
  const Batch b = as_batch(in, "canny(image)");
  const std::uint8_t* src = in.ptr<const std::uint8_t>();
  std::uint8_t* dst = out.ptr<std::uint8_t>();
  canny_map_cpu(src, b.n, b.h, b.w, t, l2, dst);
  parallel_for(b.n * b.h, std::max<std::int64_t>(1, 65536 / b.w), [&](std::int64_t r0, std::int64_t r1) {
    std::uint8_t* p = dst + r0 * b.w;
    const std::int64_t count = (r1 - r0) * b.w;
    for (std::int64_t i = 0; i < count; ++i) p[i] = p[i] == 2 ? 255 : 0;
  });
}

}  // namespace gpufleet::kernels
