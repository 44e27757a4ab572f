// canny on the CPU (Note [Canny rules] in canny.h): per row band, in parallel, Sobel, magnitude and
// non-maximum suppression (three-row ring buffers, int16 lanes) and 8-connected hysteresis within
// the band from its strong pixels (an explicit stack); then the growth across bands (canny_map_cpu).
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

// Pixels on the hysteresis stacks, packed as (y << 32) | x: no division to find a neighbourhood.
inline std::uint64_t pack(std::int64_t y, std::int64_t x) {
  return (static_cast<std::uint64_t>(y) << 32) | static_cast<std::uint64_t>(x);
}

typedef std::int16_t S16 __attribute__((vector_size(32)));
typedef std::int32_t S32x16 __attribute__((vector_size(64)));
typedef std::uint8_t U8x16 __attribute__((vector_size(16)));
typedef std::uint8_t U8x16u __attribute__((vector_size(16), aligned(1), may_alias));
typedef std::int16_t S16u __attribute__((vector_size(32), aligned(2), may_alias));
typedef std::int32_t S32x16u __attribute__((vector_size(64), aligned(4), may_alias));

// Sixteen lanes of M: loads, compares and a view as 64-bit words (for "any lane set").
template <typename M>
struct Lanes16;
template <>
struct Lanes16<std::int16_t> {
  typedef std::int16_t V __attribute__((vector_size(32)));
  typedef std::int16_t Vu __attribute__((vector_size(32), aligned(2), may_alias));
  typedef long long Q __attribute__((vector_size(32)));
};
template <>
struct Lanes16<std::int32_t> {
  typedef std::int32_t V __attribute__((vector_size(64)));
  typedef std::int32_t Vu __attribute__((vector_size(64), aligned(4), may_alias));
  typedef long long Q __attribute__((vector_size(64)));
};

#define GF_WIDEN(p) __builtin_convertvector(*reinterpret_cast<const U8x16u*>(p), S16)

// An int32 magnitude array holds the L2 magnitude, an int16 one the L1 magnitude.
template <typename M>
constexpr bool kL2 = sizeof(M) == 4;

// dx, dy (OpenCV's int16 Sobel with replicated borders) and the magnitude of pixel x of a row, given
// the row above, the row and the row below (each already clamped vertically).
template <typename M>
inline void sobel_pixel(const std::uint8_t* up, const std::uint8_t* cur, const std::uint8_t* dn, std::int64_t w,
                        std::int64_t x, std::int16_t* dx, std::int16_t* dy, M* mag) {
  const std::int64_t l = x > 0 ? x - 1 : 0, r = x + 1 < w ? x + 1 : w - 1;
  const int gx = (up[r] + 2 * cur[r] + dn[r]) - (up[l] + 2 * cur[l] + dn[l]);
  const int gy = (dn[l] - up[l]) + 2 * (dn[x] - up[x]) + (dn[r] - up[r]);
  dx[x] = static_cast<std::int16_t>(gx);
  dy[x] = static_cast<std::int16_t>(gy);
  mag[x] = static_cast<M>(kL2<M> ? gx * gx + gy * gy : std::abs(gx) + std::abs(gy));
}

// Row y's dx, dy and magnitude (mag[0..w), the caller pads around it), sixteen pixels at a time in
// int16 lanes; M is int16_t for the L1 magnitude (at most 2040) and int32_t for L2.
template <typename M>
inline __attribute__((always_inline)) void sobel_row_impl(const std::uint8_t* up, const std::uint8_t* cur,
                                                          const std::uint8_t* dn, std::int64_t w, std::int16_t* dx,
                                                          std::int16_t* dy, M* mag) {
  sobel_pixel(up, cur, dn, w, 0, dx, dy, mag);
  std::int64_t x = 1;
  for (; x + 17 <= w; x += 16) {
    const S16 u0 = GF_WIDEN(up + x - 1), u1 = GF_WIDEN(up + x), u2 = GF_WIDEN(up + x + 1);
    const S16 d0 = GF_WIDEN(dn + x - 1), d1 = GF_WIDEN(dn + x), d2 = GF_WIDEN(dn + x + 1);
    const S16 c0 = GF_WIDEN(cur + x - 1), c2 = GF_WIDEN(cur + x + 1);
    const S16 gx = (u2 + d2 + (c2 << 1)) - (u0 + d0 + (c0 << 1));
    const S16 gy = (d0 - u0) + (d2 - u2) + ((d1 - u1) << 1);
    *reinterpret_cast<S16u*>(dx + x) = gx;
    *reinterpret_cast<S16u*>(dy + x) = gy;
    if constexpr (kL2<M>) {
      const S32x16 wx = __builtin_convertvector(gx, S32x16), wy = __builtin_convertvector(gy, S32x16);
      *reinterpret_cast<S32x16u*>(mag + x) = wx * wx + wy * wy;
    } else {
      *reinterpret_cast<S16u*>(mag + x) = (gx < 0 ? -gx : gx) + (gy < 0 ? -gy : gy);
    }
  }
  for (; x < w; ++x) sobel_pixel(up, cur, dn, w, x, dx, dy, mag);
}

#undef GF_WIDEN

GF_SIMD_CLONES
void sobel_row_l1(const std::uint8_t* up, const std::uint8_t* cur, const std::uint8_t* dn, std::int64_t w,
                  std::int16_t* dx, std::int16_t* dy, std::int16_t* mag) {
  sobel_row_impl(up, cur, dn, w, dx, dy, mag);
}

GF_SIMD_CLONES
void sobel_row_l2(const std::uint8_t* up, const std::uint8_t* cur, const std::uint8_t* dn, std::int64_t w,
                  std::int16_t* dx, std::int16_t* dy, std::int32_t* mag) {
  sobel_row_impl(up, cur, dn, w, dx, dy, mag);
}

// Non-maximum suppression of pixel x (mp, mc, mn: the magnitudes of the rows above, at and below,
// indexed from -1 to w): 0 (not an edge), 1 (candidate) or 2 (strong).
template <typename M>
inline std::uint8_t nms_pixel(const M* mp, const M* mc, const M* mn, const std::int16_t* dxr, const std::int16_t* dyr,
                              std::int64_t x, int low, int high) {
  const int m = mc[x];
  if (m <= low) return 0;
  const int xs = dxr[x], ys = dyr[x];
  const int ax = xs < 0 ? -xs : xs;
  const int ay = (ys < 0 ? -ys : ys) << 15;
  const int tg22x = ax * kTg22;
  bool keep;
  if (ay < tg22x) {
    keep = m > mc[x - 1] && m >= mc[x + 1];
  } else if (ay > tg22x + (ax << 16)) {
    keep = m > mp[x] && m >= mn[x];
  } else {
    const int s = (xs ^ ys) < 0 ? -1 : 1;
    keep = m > mp[x - s] && m > mn[x + s];
  }
  return keep ? (m > high ? 2 : 1) : 0;
}

// Non-maximum suppression of one row into out[0..w), appending strong pixels (pack(y, x)) to `strong`.
// Sixteen pixels at a time: most pixels of real images are below the low threshold, so a group with
// no candidate is written as zeros at once (as OpenCV does); the others take the branch-free rules
// in M lanes, with the direction tests in int32 (|dy| << 15 needs 32 bits).
template <typename M>
inline __attribute__((always_inline)) void nms_row_impl(const M* mp, const M* mc, const M* mn,
                                                        const std::int16_t* dxr, const std::int16_t* dyr,
                                                        std::int64_t w, int low, int high, std::uint8_t* out,
                                                        std::int64_t y, std::vector<std::uint64_t>& strong) {
  using V = typename Lanes16<M>::V;
  using Vu = typename Lanes16<M>::Vu;
  using Q = typename Lanes16<M>::Q;
  constexpr int kQ = static_cast<int>(2 * sizeof(M));  // 64-bit words in 16 lanes
  const M lowm = static_cast<M>(low), highm = static_cast<M>(high);
#define LD(p) (*reinterpret_cast<const Vu*>(p))
  std::int64_t x = 0;
  for (; x + 16 <= w; x += 16) {
    const V m = LD(mc + x);
    const V cand = m > lowm;
    const Q any = reinterpret_cast<Q>(cand);
    long long bits = 0;
    for (int q = 0; q < kQ; ++q) bits |= any[q];
    if (!bits) {
      std::memset(out + x, 0, 16);
      continue;
    }
    const S16 xs = *reinterpret_cast<const S16u*>(dxr + x), ys = *reinterpret_cast<const S16u*>(dyr + x);
    const S32x16 ax = __builtin_convertvector(xs < 0 ? -xs : xs, S32x16);
    const S32x16 ay = __builtin_convertvector(ys < 0 ? -ys : ys, S32x16) << 15;
    const S32x16 tg22x = ax * kTg22;
    const V horiz = __builtin_convertvector(ay < tg22x, V);
    const V vert = __builtin_convertvector(ay > tg22x + (ax << 16), V);
    const V neg = __builtin_convertvector((xs ^ ys) < 0, V);
    const V keep_h = (m > LD(mc + x - 1)) & (m >= LD(mc + x + 1));
    const V keep_v = (m > LD(mp + x)) & (m >= LD(mn + x));
    const V keep_pos = (m > LD(mp + x - 1)) & (m > LD(mn + x + 1));  // s = +1: up-left and down-right
    const V keep_neg = (m > LD(mp + x + 1)) & (m > LD(mn + x - 1));  // s = -1: up-right and down-left
    const V keep = horiz ? keep_h : (vert ? keep_v : (neg ? keep_neg : keep_pos));
    const V edge = keep & cand;
    const V code = (edge & 1) + (edge & (m > highm) & 1);
    *reinterpret_cast<U8x16u*>(out + x) = __builtin_convertvector(code, U8x16);
    // Codes are 0, 1, 2: bit 1 marks a strong pixel; gather those bits into a 16-bit mask.
    std::uint64_t lo, hi;
    std::memcpy(&lo, out + x, 8);
    std::memcpy(&hi, out + x + 8, 8);
    constexpr std::uint64_t kGather = 0x0102040810204080ULL;  // byte i's bit 0 to bit 56 + i
    unsigned bits16 = static_cast<unsigned>((((lo >> 1) & 0x0101010101010101ULL) * kGather) >> 56) |
                      static_cast<unsigned>((((hi >> 1) & 0x0101010101010101ULL) * kGather) >> 56) << 8;
    for (; bits16; bits16 &= bits16 - 1) strong.push_back(pack(y, x + __builtin_ctz(bits16)));
  }
#undef LD
  for (; x < w; ++x) {
    const std::uint8_t c = nms_pixel(mp, mc, mn, dxr, dyr, x, low, high);
    out[x] = c;
    if (c == 2) strong.push_back(pack(y, x));
  }
}

GF_SIMD_CLONES
void nms_row_l1(const std::int16_t* mp, const std::int16_t* mc, const std::int16_t* mn, const std::int16_t* dxr,
                const std::int16_t* dyr, std::int64_t w, int low, int high, std::uint8_t* out, std::int64_t y,
                std::vector<std::uint64_t>& strong) {
  nms_row_impl(mp, mc, mn, dxr, dyr, w, low, high, out, y, strong);
}

GF_SIMD_CLONES
void nms_row_l2(const std::int32_t* mp, const std::int32_t* mc, const std::int32_t* mn, const std::int16_t* dxr,
                const std::int16_t* dyr, std::int64_t w, int low, int high, std::uint8_t* out, std::int64_t y,
                std::vector<std::uint64_t>& strong) {
  nms_row_impl(mp, mc, mn, dxr, dyr, w, low, high, out, y, strong);
}

template <typename M>
void classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                   int low, int high, std::uint8_t* map, std::vector<std::uint64_t>& strong) {
  const std::int64_t stride = w + 2;  // magnitudes padded with a zero on each side
  std::vector<M> mag(3 * stride, 0);
  std::vector<std::int16_t> gx(3 * w), gy(3 * w);
  auto row = [&](std::int64_t y) { return img + std::clamp<std::int64_t>(y, 0, h - 1) * w; };
  auto slot = [](std::int64_t y) { return static_cast<std::size_t>((y + 3) % 3); };
  auto compute = [&](std::int64_t y) {
    const std::size_t k = slot(y);
    M* m = mag.data() + k * stride + 1;
    if (y < 0 || y >= h) {
      std::fill(m - 1, m + w + 1, M{0});
      return;
    }
    if constexpr (!kL2<M>)
      sobel_row_l1(row(y - 1), row(y), row(y + 1), w, gx.data() + k * w, gy.data() + k * w, m);
    else
      sobel_row_l2(row(y - 1), row(y), row(y + 1), w, gx.data() + k * w, gy.data() + k * w, m);
  };
  compute(y0 - 1);
  compute(y0);
  for (std::int64_t y = y0; y < y1; ++y) {
    compute(y + 1);
    const M* mp = mag.data() + slot(y - 1) * stride + 1;
    const M* mc = mag.data() + slot(y) * stride + 1;
    const M* mn = mag.data() + slot(y + 1) * stride + 1;
    const std::size_t k = slot(y);
    if constexpr (!kL2<M>)
      nms_row_l1(mp, mc, mn, gx.data() + k * w, gy.data() + k * w, w, low, high, map + y * w, y, strong);
    else
      nms_row_l2(mp, mc, mn, gx.data() + k * w, gy.data() + k * w, w, low, high, map + y * w, y, strong);
  }
}

}  // namespace

void canny_classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                         const CannyThresholds& t, bool l2, std::uint8_t* map, std::vector<std::uint64_t>& strong) {
  // Thresholds lie in [-1, 4.2e6] (canny_thresholds); L1 magnitudes are at most 2040, so clamping to
  // int16 changes no comparison.
  if (l2) {
    classify_band<std::int32_t>(img, h, w, y0, y1, static_cast<int>(t.low), static_cast<int>(t.high), map, strong);
  } else {
    const auto c = [](std::int64_t v) { return static_cast<int>(std::min<std::int64_t>(v, 32767)); };
    classify_band<std::int16_t>(img, h, w, y0, y1, c(t.low), c(t.high), map, strong);
  }
}

void canny_grow(std::uint8_t* map, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                std::vector<std::uint64_t>& stack, std::vector<std::uint64_t>* rim) {
  while (!stack.empty()) {
    const std::uint64_t p = stack.back();
    stack.pop_back();
    const std::int64_t y = static_cast<std::int64_t>(p >> 32), x = static_cast<std::int64_t>(p & 0xffffffffu);
    const std::int64_t xl = x > 0 ? x - 1 : 0, xr = x + 1 < w ? x + 1 : w - 1;
    const std::int64_t yl = std::max(y - 1, y0), yr = std::min(y + 1, y1 - 1);
    if (rim && ((y - 1 < y0 && y > 0) || (y + 1 >= y1 && y + 1 < h))) rim->push_back(p);
    for (std::int64_t yy = yl; yy <= yr; ++yy) {
      std::uint8_t* m = map + yy * w;
      for (std::int64_t xx = xl; xx <= xr; ++xx) {
        if (m[xx] == 1) {
          m[xx] = 2;
          stack.push_back(pack(yy, xx));
        }
      }
    }
  }
}

void canny_map_cpu(const std::uint8_t* src, std::int64_t n, std::int64_t h, std::int64_t w, const CannyThresholds& t,
                   bool l2, std::uint8_t* map) {
  const std::int64_t plane = h * w;
  const std::int64_t band = std::max<std::int64_t>(8, std::min<std::int64_t>(h, 65536 / w + 1));
  const std::int64_t bands = (h + band - 1) / band;
  // Each band is classified and grown within its own rows; the pixels of a band's first and last
  // rows whose growth would cross into a neighbour band are kept on `rims` and grown over the whole
  // image afterwards. Growth is monotone, so the order does not change the result.
  std::vector<std::vector<std::uint64_t>> rims(n * bands);
  parallel_for(n * bands, 1, [&](std::int64_t t0, std::int64_t t1) {
    std::vector<std::uint64_t> stack;
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t img = task / bands, y0 = (task % bands) * band, y1 = std::min(h, y0 + band);
      stack.clear();
      canny_classify_band(src + img * plane, h, w, y0, y1, t, l2, map + img * plane, stack);
      canny_grow(map + img * plane, h, w, y0, y1, stack, &rims[task]);
    }
  });
  parallel_for(n, 1, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t img = i0; img < i1; ++img)
      for (std::int64_t b = 0; b < bands; ++b) canny_grow(map + img * plane, h, w, 0, h, rims[img * bands + b], nullptr);
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
