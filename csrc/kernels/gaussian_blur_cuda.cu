// gaussian_blur on CUDA: a row pass into a float32 scratch image, then a column pass, each block
// staging its tile plus the kernel's halo in shared memory; the whole batch in two launches on the
// caller's stream, any batch size (Note [Grid-stride launches] in launch_shape.h). The taps reach the
// device through pinned staging (upload_async), so the host never waits. Matches the CPU path
// (gaussian_blur_cpu.cpp): float32 to float rounding (same taps, same symmetric folding), uint8 bit
// for bit (exact integer sums).
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cuda_util.h"
#include "kernels/gaussian_blur.h"
#include "kernels/gaussian_blur_cuda.cuh"

namespace gpufleet::kernels {

namespace {

__device__ inline std::int64_t border_index_d(std::int64_t i, std::int64_t n, int border) {
  if (i >= 0 && i < n) return i;
  if (border == static_cast<int>(Border::Replicate)) return i < 0 ? 0 : n - 1;
  if (border == static_cast<int>(Border::Constant)) return -1;
  if (n == 1) return 0;
  while (i < 0 || i >= n) {
    if (i < 0) i = -i;
    if (i >= n) i = 2 * n - 2 - i;
  }
  return i;
}

template <class T>
__device__ inline T store_value(float v);
template <>
__device__ inline float store_value<float>(float v) { return v; }
// uint8: Note [uint8 blur is integer arithmetic]. With the fixed-point taps (integers summing to 256)
// every product and partial sum is an integer below 255 * 2^16 < 2^24, so float arithmetic is exact
// and matches the CPU's integer sums bit for bit; the result is (sum + 2^15) >> 16.
template <>
__device__ inline std::uint8_t store_value<std::uint8_t>(float v) {
  const unsigned r = (static_cast<unsigned>(v) + (1u << 15)) >> 16;
  return static_cast<std::uint8_t>(r > 255u ? 255u : r);
}

// Rows (all images stacked): each block covers kRowThreadsX outputs of kRowThreadsY rows per step,
// stepping over row groups by gridDim.y and over column tiles by gridDim.x. Shared: one row of
// (blockDim.x + 2r) values per thread row. Taps: k[0..2r] in global memory (read uniformly).
template <class T>
__global__ void blur_rows(const T* __restrict__ in, float* __restrict__ out, std::int64_t w, std::int64_t rows,
                          const float* __restrict__ k, int r, int border) {
  extern __shared__ float sm[];
  const int tile_w = blockDim.x + 2 * r;
  float* s = sm + threadIdx.y * tile_w;
  const std::int64_t col_tiles = (w + blockDim.x - 1) / blockDim.x;
  const std::int64_t row_groups = (rows + blockDim.y - 1) / blockDim.y;
  for (std::int64_t rg = blockIdx.y; rg < row_groups; rg += gridDim.y) {
    const std::int64_t row = rg * blockDim.y + threadIdx.y;
    for (std::int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
      const std::int64_t x0 = ct * blockDim.x;
      if (row < rows) {
        const T* src = in + row * w;
        for (int i = threadIdx.x; i < tile_w; i += blockDim.x) {
          const std::int64_t xi = border_index_d(x0 - r + i, w, border);
          s[i] = xi < 0 ? 0.f : static_cast<float>(src[xi]);
        }
      }
      __syncthreads();
      const std::int64_t x = x0 + threadIdx.x;
      if (row < rows && x < w) {
        const float* p = s + threadIdx.x;
        float acc = k[r] * p[r];
        for (int j = 0; j < r; ++j) acc += k[j] * (p[j] + p[2 * r - j]);
        out[row * w + x] = acc;
      }
      __syncthreads();  // the tile is rewritten at the next step
    }
  }
}

// Columns: kColThreadsX columns x kColTileRows output rows of one image per step, stepping over
// images (z), row tiles (y) and column tiles (x). Shared: (kColTileRows + 2r) rows of kColThreadsX.
template <class T>
__global__ void blur_cols_tiled(const float* __restrict__ in, T* __restrict__ out, std::int64_t n, std::int64_t h,
                                std::int64_t w, const float* __restrict__ k, int r, int border) {
  extern __shared__ float s[];
  const std::int64_t col_tiles = (w + kColThreadsX - 1) / kColThreadsX;
  const std::int64_t row_tiles = (h + kColTileRows - 1) / kColTileRows;
  const int tile_h = kColTileRows + 2 * r;
  for (std::int64_t img = blockIdx.z; img < n; img += gridDim.z) {
    const float* base = in + img * h * w;
    for (std::int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      const std::int64_t y0 = rt * kColTileRows;
      for (std::int64_t ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
        const std::int64_t x = ct * kColThreadsX + threadIdx.x;
        for (int i = threadIdx.y; i < tile_h; i += blockDim.y) {
          const std::int64_t yi = border_index_d(y0 - r + i, h, border);
          s[i * kColThreadsX + threadIdx.x] = (yi < 0 || x >= w) ? 0.f : base[yi * w + x];
        }
        __syncthreads();
        if (x < w) {
          for (int t = 0; t < kColRowsPerThread; ++t) {
            const int ly = threadIdx.y + t * kColThreadsY;
            const std::int64_t y = y0 + ly;
            if (y >= h) break;
            const float* p = s + ly * kColThreadsX + threadIdx.x;
            float acc = k[r] * p[r * kColThreadsX];
            for (int j = 0; j < r; ++j) acc += k[j] * (p[j * kColThreadsX] + p[(2 * r - j) * kColThreadsX]);
            out[img * h * w + y * w + x] = store_value<T>(acc);
          }
        }
        __syncthreads();  // the tile is rewritten at the next step
      }
    }
  }
}

// Kernels too tall for a shared tile read the column straight from global memory (L1/L2 cached).
template <class T>
__global__ void blur_cols_direct(const float* __restrict__ in, T* __restrict__ out, std::int64_t n, std::int64_t h,
                                 std::int64_t w, const float* __restrict__ k, int r, int border) {
  for (std::int64_t img = blockIdx.z; img < n; img += gridDim.z) {
    const float* base = in + img * h * w;
    for (std::int64_t y = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; y < h;
         y += static_cast<std::int64_t>(gridDim.y) * blockDim.y) {
      for (std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < w;
           x += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        auto at = [&](std::int64_t yy) {
          const std::int64_t i = border_index_d(yy, h, border);
          return i < 0 ? 0.f : base[i * w + x];
        };
        float acc = k[r] * base[y * w + x];
        for (int j = 0; j < r; ++j) acc += k[j] * (at(y - r + j) + at(y + r - j));
        out[img * h * w + y * w + x] = store_value<T>(acc);
      }
    }
  }
}

template <class T>
void run_blur(const T* in, T* out, std::int64_t n, std::int64_t h, std::int64_t w, const BlurPlan& plan,
              cudaStream_t stream) {
  const int rx = static_cast<int>(plan.kx.size() / 2), ry = static_cast<int>(plan.ky.size() / 2);
  // float32: the float taps; uint8: the fixed-point taps as (exact) floats.
  std::vector<float> host_taps;
  if constexpr (std::is_same_v<T, float>) {
    host_taps.insert(host_taps.end(), plan.kx.begin(), plan.kx.end());
    host_taps.insert(host_taps.end(), plan.ky.begin(), plan.ky.end());
  } else {
    for (auto k : plan.kx_u8) host_taps.push_back(static_cast<float>(k));
    for (auto k : plan.ky_u8) host_taps.push_back(static_cast<float>(k));
  }
  Scratch<float> taps(host_taps.size(), stream);
  upload_async(taps.get(), host_taps.data(), host_taps.size() * sizeof(float), stream);
  const float* kx = taps.get();
  const float* ky = taps.get() + plan.kx.size();
  const int border = static_cast<int>(plan.border);
  Scratch<float> tmp(static_cast<std::size_t>(n * h * w), stream);

  const Launch rl = blur_rows_launch(n * h, w, rx);
  blur_rows<T><<<as_dim3(rl.grid), as_dim3(rl.block), rl.shared, stream>>>(in, tmp.get(), w, n * h, kx, rx, border);
  GF_CUDA_CHECK_LAUNCH();
  const Launch cl = blur_cols_launch(n, h, w, ry);
  if (blur_cols_use_tile(ry))
    blur_cols_tiled<T><<<as_dim3(cl.grid), as_dim3(cl.block), cl.shared, stream>>>(tmp.get(), out, n, h, w, ky, ry,
                                                                                   border);
  else
    blur_cols_direct<T><<<as_dim3(cl.grid), as_dim3(cl.block), 0, stream>>>(tmp.get(), out, n, h, w, ky, ry, border);
  GF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void check_blur_cuda(const BlurPlan& plan) {
  GFK_CHECK_ARG(plan.kx.size() / 2 <= kMaxCudaRadius && plan.ky.size() / 2 <= kMaxCudaRadius,
                "gaussian_blur: a {}x{} kernel is too large for the CUDA backend (at most {} taps per direction); "
                "use a CPU array",
                plan.kx.size(), plan.ky.size(), 2 * kMaxCudaRadius + 1);
}

void gaussian_blur_cuda_raw(const void* in, void* out, DType dtype, std::int64_t n, std::int64_t h, std::int64_t w,
                            const BlurPlan& plan, cudaStream_t stream) {
  check_blur_cuda(plan);
  if (dtype == DType::F32)
    run_blur(static_cast<const float*>(in), static_cast<float*>(out), n, h, w, plan, stream);
  else
    run_blur(static_cast<const std::uint8_t*>(in), static_cast<std::uint8_t*>(out), n, h, w, plan, stream);
}

void gaussian_blur_cuda(const ArrayRef& in, const ArrayRef& out, const BlurPlan& plan) {
  const Batch b = as_batch(in, "gaussian_blur(x)");
  DeviceGuard guard(in.device.index);
  gaussian_blur_cuda_raw(in.data, out.data, in.dtype, b.n, b.h, b.w, plan, as_stream(in.stream));
}

}  // namespace gpufleet::kernels
