// gaussian_blur on the CPU: a row pass into a float32 scratch image, then a column pass, both
// multi-threaded over rows and vectorised over x with the kernel's symmetry folded in
// (k[j] * (a + b) for the taps j and 2r - j). float32 in float arithmetic, uint8 in OpenCV's exact
// fixed point (Note [uint8 blur is integer arithmetic]).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/gaussian_blur.h"
#include "kernels/parallel.h"
#include "kernels/simd.h"

namespace gpufleet::kernels {

namespace {

// dst[x] = k[r] * mid[x] + sum_{j<r} k[j] * (lo[j][x] + hi[j][x]) for x in [0, w): blocks of four
// 32-byte vectors (GCC vector extensions: AVX2 registers in the haswell clone, SSE pairs otherwise)
// stay in registers while the taps run in the inner loop.
template <class T>
inline __attribute__((always_inline)) void symmetric_filter_body(const T* const* lo, const T* const* hi, const T* mid,
                                                                 const T* k, int r, T* dst, std::int64_t w) {
  typedef T V __attribute__((vector_size(32)));
  typedef T V_u __attribute__((vector_size(32), aligned(4), may_alias));
  constexpr std::int64_t L = 32 / sizeof(T);
#define load(p) (*reinterpret_cast<const V_u*>(p))
#define store(p, v) (*reinterpret_cast<V_u*>(p) = (v))
  const T kc = k[r];
  std::int64_t x = 0;
  for (; x + 4 * L <= w; x += 4 * L) {
    V a0 = kc * load(mid + x), a1 = kc * load(mid + x + L), a2 = kc * load(mid + x + 2 * L),
      a3 = kc * load(mid + x + 3 * L);
    for (int j = 0; j < r; ++j) {
      const T* a = lo[j] + x;
      const T* c = hi[j] + x;
      const T kj = k[j];
      a0 += kj * (load(a) + load(c));
      a1 += kj * (load(a + L) + load(c + L));
      a2 += kj * (load(a + 2 * L) + load(c + 2 * L));
      a3 += kj * (load(a + 3 * L) + load(c + 3 * L));
    }
    store(dst + x, a0);
    store(dst + x + L, a1);
    store(dst + x + 2 * L, a2);
    store(dst + x + 3 * L, a3);
  }
  for (; x + L <= w; x += L) {
    V a0 = kc * load(mid + x);
    for (int j = 0; j < r; ++j) a0 += k[j] * (load(lo[j] + x) + load(hi[j] + x));
    store(dst + x, a0);
  }
  for (; x < w; ++x) {
    T acc = kc * mid[x];
    for (int j = 0; j < r; ++j) acc += k[j] * (lo[j][x] + hi[j][x]);
    dst[x] = acc;
  }
#undef load
#undef store
}

GF_SIMD_CLONES
void symmetric_filter(const float* const* lo, const float* const* hi, const float* mid, const float* k, int r,
                      float* dst, std::int64_t w) {
  symmetric_filter_body(lo, hi, mid, k, r, dst, w);
}

// uint8 inputs: exact integer sums (Note [uint8 blur is integer arithmetic]); row sums < 2^16, column
// sums < 2^24.
GF_SIMD_CLONES
void symmetric_filter(const std::uint32_t* const* lo, const std::uint32_t* const* hi, const std::uint32_t* mid,
                      const std::uint32_t* k, int r, std::uint32_t* dst, std::int64_t w) {
  symmetric_filter_body(lo, hi, mid, k, r, dst, w);
}

// T: the image type; A: the arithmetic (float for float32, uint32 fixed point for uint8).
template <class T, class A>
void blur(const ArrayRef& in, const ArrayRef& out, const BlurPlan& plan, const std::vector<A>& kx,
          const std::vector<A>& ky) {
  const Batch b = as_batch(in, "gaussian_blur(x)");
  const std::int64_t w = b.w, h = b.h, rows = b.n * b.h;
  const int rx = static_cast<int>(kx.size() / 2), ry = static_cast<int>(ky.size() / 2);
  const T* src = in.ptr<const T>();
  std::vector<A> tmp(static_cast<std::size_t>(rows * w));
  const std::int64_t grain = std::max<std::int64_t>(1, 16384 / w);

  // Row pass: pad each row by the border rule into `buf`, then filter.
  parallel_for(rows, grain, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<A> buf(static_cast<std::size_t>(w + 2 * rx));
    std::vector<const A*> lo(rx), hi(rx);
    for (int j = 0; j < rx; ++j) {
      lo[j] = buf.data() + j;
      hi[j] = buf.data() + 2 * rx - j;
    }
    for (std::int64_t row = r0; row < r1; ++row) {
      const T* s = src + row * w;
      for (std::int64_t i = 0; i < rx; ++i) {
        const std::int64_t l = border_index(i - rx, w, plan.border), rr = border_index(w + i, w, plan.border);
        buf[i] = l < 0 ? A(0) : static_cast<A>(s[l]);
        buf[w + rx + i] = rr < 0 ? A(0) : static_cast<A>(s[rr]);
      }
      for (std::int64_t x = 0; x < w; ++x) buf[rx + x] = static_cast<A>(s[x]);
      symmetric_filter(lo.data(), hi.data(), buf.data() + rx, kx.data(), rx, tmp.data() + row * w, w);
    }
  });

  // Column pass: output row y reads scratch rows y-ry .. y+ry (mapped by the border rule). Each chunk
  // of rows is swept in vertical strips so the window of 2*ry+1 strip rows stays in L1/L2 from one
  // output row to the next.
  constexpr std::int64_t kStrip = 512;
  const std::vector<A> zeros(plan.border == Border::Constant ? w : 0, A(0));
  parallel_for(rows, grain, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<const A*> lo(ry), hi(ry);
    std::vector<A> row_out(std::is_same_v<T, float> ? 0 : w);
    for (std::int64_t x0 = 0; x0 < w; x0 += kStrip) {
      const std::int64_t sw = std::min(kStrip, w - x0);
      for (std::int64_t row = r0; row < r1; ++row) {
        const std::int64_t img = row / h, y = row % h;
        const A* base = tmp.data() + img * h * w + x0;
        auto row_ptr = [&](std::int64_t yy) {
          const std::int64_t i = border_index(yy, h, plan.border);
          return i < 0 ? zeros.data() : base + i * w;
        };
        for (int j = 0; j < ry; ++j) {
          lo[j] = row_ptr(y - ry + j);
          hi[j] = row_ptr(y + ry - j);
        }
        if constexpr (std::is_same_v<T, float>) {
          symmetric_filter(lo.data(), hi.data(), base + y * w, ky.data(), ry, out.ptr<float>() + row * w + x0, sw);
        } else {
          symmetric_filter(lo.data(), hi.data(), base + y * w, ky.data(), ry, row_out.data(), sw);
          std::uint8_t* d = out.ptr<std::uint8_t>() + row * w + x0;
          for (std::int64_t x = 0; x < sw; ++x) {
            const std::uint32_t v = (row_out[x] + (1u << 15)) >> 16;
            d[x] = static_cast<std::uint8_t>(v > 255 ? 255 : v);
          }
        }
      }
    }
  });
}

}  // namespace

void gaussian_blur_cpu(const ArrayRef& in, const ArrayRef& out, const BlurPlan& plan) {
  if (in.dtype == DType::F32)
    blur<float, float>(in, out, plan, plan.kx, plan.ky);
  else
    blur<std::uint8_t, std::uint32_t>(in, out, plan, plan.kx_u8, plan.ky_u8);
}

}  // namespace gpufleet::kernels
