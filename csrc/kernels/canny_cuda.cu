// canny on CUDA (Note [Canny rules] in canny.h), a whole batch per launch sequence, any batch size
// (Note [Grid-stride launches] in launch_shape.h):
// 1. classify: each 32x8 block stages its pixels with a 2-pixel halo (replicated borders) and the
//    magnitudes with a 1-pixel halo (0 outside the image) in shared memory, applies the integer
//    non-maximum suppression and appends its strong pixels to the image's worklist;
// 2. hysteresis: one block per image grows the worklist breadth-first through 8-connected candidates
//    (atomicCAS 1 -> 2, so each pixel enters once), round after round until a round adds nothing;
// 3. finalize: 2 -> 255, else 0.
#include <cstdint>

#include "kernels/canny.h"
#include "kernels/cuda_util.h"
#include "kernels/kernels_cuda.cuh"

namespace gpufleet::kernels {

namespace {

constexpr int kTX = kCannyTX, kTY = kCannyTY;
constexpr int kTg22 = 13573;

__device__ inline std::int64_t clampi(std::int64_t v, std::int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// One 32 x 8 tile of one image per step; blocks step over images (z), tile rows (y), tile columns (x).
__global__ void canny_classify(const std::uint8_t* __restrict__ in, std::int32_t* __restrict__ state, std::int64_t n,
                               std::int64_t h, std::int64_t w, int low, int high, bool l2,
                               std::int32_t* __restrict__ queue, std::int32_t* __restrict__ tail) {
  __shared__ int pix[kTY + 4][kTX + 4];
  __shared__ int mag[kTY + 2][kTX + 2];
  const std::int64_t plane = h * w, tile_rows = (h + kTY - 1) / kTY, tile_cols = (w + kTX - 1) / kTX;
  const int tid = threadIdx.y * kTX + threadIdx.x;
  for (std::int64_t img = blockIdx.z; img < n; img += gridDim.z) {
    const std::uint8_t* src = in + img * plane;
    for (std::int64_t ty = blockIdx.y; ty < tile_rows; ty += gridDim.y) {
      for (std::int64_t tx = blockIdx.x; tx < tile_cols; tx += gridDim.x) {
        const std::int64_t x0 = tx * kTX, y0 = ty * kTY;
        for (int i = tid; i < (kTY + 4) * (kTX + 4); i += kTX * kTY) {
          const int ly = i / (kTX + 4), lx = i % (kTX + 4);
          pix[ly][lx] = src[clampi(y0 - 2 + ly, h - 1) * w + clampi(x0 - 2 + lx, w - 1)];
        }
        __syncthreads();
        for (int i = tid; i < (kTY + 2) * (kTX + 2); i += kTX * kTY) {
          const int ly = i / (kTX + 2), lx = i % (kTX + 2);
          const std::int64_t gy = y0 - 1 + ly, gx = x0 - 1 + lx;
          int m = 0;
          if (gy >= 0 && gy < h && gx >= 0 && gx < w) {
            const int cy = ly + 1, cx = lx + 1;
            const int dx = (pix[cy - 1][cx + 1] + 2 * pix[cy][cx + 1] + pix[cy + 1][cx + 1]) -
                           (pix[cy - 1][cx - 1] + 2 * pix[cy][cx - 1] + pix[cy + 1][cx - 1]);
            const int dy = (pix[cy + 1][cx - 1] + 2 * pix[cy + 1][cx] + pix[cy + 1][cx + 1]) -
                           (pix[cy - 1][cx - 1] + 2 * pix[cy - 1][cx] + pix[cy - 1][cx + 1]);
            m = l2 ? dx * dx + dy * dy : abs(dx) + abs(dy);
          }
          mag[ly][lx] = m;
        }
        __syncthreads();
        const std::int64_t x = x0 + threadIdx.x, y = y0 + threadIdx.y;
        if (x < w && y < h) {
          const int cy = threadIdx.y + 2, cx = threadIdx.x + 2;
          const int xs = (pix[cy - 1][cx + 1] + 2 * pix[cy][cx + 1] + pix[cy + 1][cx + 1]) -
                         (pix[cy - 1][cx - 1] + 2 * pix[cy][cx - 1] + pix[cy + 1][cx - 1]);
          const int ys = (pix[cy + 1][cx - 1] + 2 * pix[cy + 1][cx] + pix[cy + 1][cx + 1]) -
                         (pix[cy - 1][cx - 1] + 2 * pix[cy - 1][cx] + pix[cy - 1][cx + 1]);
          const int my = threadIdx.y + 1, mx = threadIdx.x + 1;
          const int m = mag[my][mx];
          int code = 0;
          if (m > low) {
            const int ax = abs(xs), ay = abs(ys) << 15;
            const int tg22x = ax * kTg22;
            bool keep;
            if (ay < tg22x) {
              keep = m > mag[my][mx - 1] && m >= mag[my][mx + 1];
            } else {
              const int tg67x = tg22x + (ax << 16);
              if (ay > tg67x) {
                keep = m > mag[my - 1][mx] && m >= mag[my + 1][mx];
              } else {
                const int s = (xs ^ ys) < 0 ? -1 : 1;
                keep = m > mag[my - 1][mx - s] && m > mag[my + 1][mx + s];
              }
            }
            if (keep) code = m > high ? 2 : 1;
          }
          const std::int64_t p = y * w + x;
          state[img * plane + p] = code;
          if (code == 2) {
            const int slot = atomicAdd(&tail[img], 1);
            queue[img * plane + slot] = static_cast<std::int32_t>(p);
          }
        }
        __syncthreads();  // pix/mag are rewritten at the next step
      }
    }
  }
}

// One block per image at a time (blocks step over images). The worklist holds each pixel at most
// once (strong ones from classify, weak ones when this kernel flips them), so `plane` entries suffice.
__global__ void __launch_bounds__(kHysteresisThreads)
    canny_hysteresis(std::int32_t* __restrict__ state, std::int64_t n, std::int64_t h, std::int64_t w,
                     std::int32_t* __restrict__ queue, std::int32_t* __restrict__ tail) {
  __shared__ int begin, end;
  const std::int64_t plane = h * w;
  for (std::int64_t img = blockIdx.x; img < n; img += gridDim.x) {
    std::int32_t* st = state + img * plane;
    std::int32_t* q = queue + img * plane;
    if (threadIdx.x == 0) {
      begin = 0;
      end = atomicAdd(&tail[img], 0);
    }
    __syncthreads();
    while (begin < end) {
      const int b = begin, e = end;
      for (int i = b + threadIdx.x; i < e; i += blockDim.x) {
        const std::int64_t p = q[i], y = p / w, x = p % w;
        for (int dy = -1; dy <= 1; ++dy) {
          const std::int64_t yy = y + dy;
          if (yy < 0 || yy >= h) continue;
          for (int dx = -1; dx <= 1; ++dx) {
            const std::int64_t xx = x + dx;
            if (xx < 0 || xx >= w) continue;
            const std::int64_t qi = yy * w + xx;
            if (st[qi] == 1 && atomicCAS(&st[qi], 1, 2) == 1) {
              const int slot = atomicAdd(&tail[img], 1);
              q[slot] = static_cast<std::int32_t>(qi);
            }
          }
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        begin = e;
        end = atomicAdd(&tail[img], 0);
      }
      __syncthreads();
    }
  }
}

__global__ void canny_finalize(const std::int32_t* __restrict__ state, std::uint8_t* __restrict__ out, std::int64_t total) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = state[i] == 2 ? 255 : 0;
}

}  // namespace

void check_canny_cuda(std::int64_t h, std::int64_t w) {
  GFK_CHECK_ARG(h * w < (std::int64_t{1} << 31),
                "canny: images of {}x{} pixels are too large for the CUDA backend (at most 2^31 - 1 pixels per image: "
                "its worklist holds int32 indices); use a CPU array",
                h, w);
}

void launch_canny(const std::uint8_t* in, std::uint8_t* out, std::int32_t* state, std::int64_t n, std::int64_t h,
                  std::int64_t w, const CannyThresholds& t, bool l2, cudaStream_t stream) {
  check_canny_cuda(h, w);
  Scratch<std::int32_t> queue(static_cast<std::size_t>(n * h * w), stream);
  Scratch<std::int32_t> tail(static_cast<std::size_t>(n), stream);
  GFK_CUDA_TRY(cudaMemsetAsync(tail.get(), 0, sizeof(std::int32_t) * n, stream));
  const Launch cl = canny_classify_launch(n, h, w);
  canny_classify<<<as_dim3(cl.grid), as_dim3(cl.block), 0, stream>>>(in, state, n, h, w, static_cast<int>(t.low),
                                                                     static_cast<int>(t.high), l2, queue.get(),
                                                                     tail.get());
  GF_CUDA_CHECK_LAUNCH();
  canny_hysteresis<<<grid_dim(n, kMaxGridX), kHysteresisThreads, 0, stream>>>(state, n, h, w, queue.get(), tail.get());
  GF_CUDA_CHECK_LAUNCH();
  if (out) {
    const Launch fl = flat_launch(n * h * w);
    canny_finalize<<<as_dim3(fl.grid), as_dim3(fl.block), 0, stream>>>(state, out, n * h * w);
    GF_CUDA_CHECK_LAUNCH();
  }
}

void canny_cuda(const ArrayRef& in, const ArrayRef& out, const CannyThresholds& t, bool l2) {
  const Batch b = as_batch(in, "canny(image)");
  DeviceGuard guard(in.device.index);
  const cudaStream_t stream = as_stream(in.stream);
  Scratch<std::int32_t> state(static_cast<std::size_t>(b.n * b.plane()), stream);
  launch_canny(in.ptr<const std::uint8_t>(), out.ptr<std::uint8_t>(), state.get(), b.n, b.h, b.w, t, l2, stream);
}

}  // namespace gpufleet::kernels
