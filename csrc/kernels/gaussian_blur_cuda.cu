// gaussian_blur on CUDA: a row pass into a float32 scratch image, then a column pass, each block
// staging its tile plus the kernel's halo in shared memory (taps in shared memory too); the whole
// batch in two launches on the caller's stream. Matches the CPU path (gaussian_blur_cpu.cpp): float32
// to float rounding (same taps, same symmetric folding), uint8 bit for bit (exact integer sums).
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cuda_util.h"
#include "kernels/gaussian_blur.h"
#include "kernels/gaussian_blur_cuda.cuh"

namespace gpufleet::kernels {

namespace {

constexpr int kRowThreadsX = 128, kRowThreadsY = 4;
constexpr int kColThreadsX = 32, kColThreadsY = 8, kColRowsPerThread = 8;
constexpr int kColTileRows = kColThreadsY * kColRowsPerThread;  // output rows per block
constexpr std::size_t kMaxShared = 48 * 1024;

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

// One block: kRowThreadsY rows x kRowThreadsX outputs. Shared: taps, then rows of (blockDim.x + 2r).
template <class T>
__global__ void blur_rows(const T* __restrict__ in, float* __restrict__ out, std::int64_t w, std::int64_t rows,
                          const float* __restrict__ taps, int r, int border) {
  extern __shared__ float sm[];
  float* k = sm;
  const int tile_w = blockDim.x + 2 * r;
  float* s = sm + (2 * r + 1) + threadIdx.y * tile_w;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int i = tid; i < 2 * r + 1; i += blockDim.x * blockDim.y) k[i] = taps[i];
  const std::int64_t x0 = static_cast<std::int64_t>(blockIdx.x) * blockDim.x;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
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
}

// One block: kColThreadsX columns x kColTileRows output rows of one image (blockIdx.z). Shared: taps,
// then (kColTileRows + 2r) rows of kColThreadsX columns.
template <class T>
__global__ void blur_cols_tiled(const float* __restrict__ in, T* __restrict__ out, std::int64_t h, std::int64_t w,
                                const float* __restrict__ taps, int r, int border) {
  extern __shared__ float sm[];
  float* k = sm;
  float* s = sm + (2 * r + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int i = tid; i < 2 * r + 1; i += blockDim.x * blockDim.y) k[i] = taps[i];
  const std::int64_t img = blockIdx.z;
  const float* base = in + img * h * w;
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * kColThreadsX + threadIdx.x;
  const std::int64_t y0 = static_cast<std::int64_t>(blockIdx.y) * kColTileRows;
  const int tile_h = kColTileRows + 2 * r;
  for (int i = threadIdx.y; i < tile_h; i += blockDim.y) {
    const std::int64_t yi = border_index_d(y0 - r + i, h, border);
    s[i * kColThreadsX + threadIdx.x] = (yi < 0 || x >= w) ? 0.f : base[yi * w + x];
  }
  __syncthreads();
  if (x >= w) return;
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

// Kernels too tall for a shared tile read the column straight from global memory (L1/L2 cached).
template <class T>
__global__ void blur_cols_direct(const float* __restrict__ in, T* __restrict__ out, std::int64_t h, std::int64_t w,
                                 const float* __restrict__ taps, int r, int border) {
  const std::int64_t img = blockIdx.z;
  const std::int64_t x = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t y = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (x >= w || y >= h) return;
  const float* base = in + img * h * w;
  auto at = [&](std::int64_t yy) {
    const std::int64_t i = border_index_d(yy, h, border);
    return i < 0 ? 0.f : base[i * w + x];
  };
  float acc = taps[r] * base[y * w + x];
  for (int j = 0; j < r; ++j) acc += taps[j] * (at(y - r + j) + at(y + r - j));
  out[img * h * w + y * w + x] = store_value<T>(acc);
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
  // Pageable host -> device: staged by the driver, ordered on the stream, no wait for earlier work.
  GFK_CUDA_TRY(cudaMemcpyAsync(taps.get(), host_taps.data(), host_taps.size() * sizeof(float), cudaMemcpyHostToDevice,
                               stream));
  const float* kx = taps.get();
  const float* ky = taps.get() + plan.kx.size();
  const int border = static_cast<int>(plan.border);
  Scratch<float> tmp(static_cast<std::size_t>(n * h * w), stream);

  const std::size_t row_shared = sizeof(float) * ((2 * rx + 1) + kRowThreadsY * (kRowThreadsX + 2 * rx));
  GFK_CHECK_ARG(row_shared <= kMaxShared, "gaussian_blur: a row tile of {} bytes exceeds shared memory", row_shared);  // rx <= kMaxCudaRadius
  const dim3 rb(kRowThreadsX, kRowThreadsY);
  const dim3 rg(static_cast<unsigned>((w + kRowThreadsX - 1) / kRowThreadsX),
                static_cast<unsigned>((n * h + kRowThreadsY - 1) / kRowThreadsY));
  blur_rows<T><<<rg, rb, row_shared, stream>>>(in, tmp.get(), w, n * h, kx, rx, border);
  GF_CUDA_CHECK_LAUNCH();

  const std::size_t col_shared = sizeof(float) * ((2 * ry + 1) + (kColTileRows + 2 * ry) * kColThreadsX);
  if (col_shared <= kMaxShared) {
    const dim3 cb(kColThreadsX, kColThreadsY);
    const dim3 cg(static_cast<unsigned>((w + kColThreadsX - 1) / kColThreadsX),
                  static_cast<unsigned>((h + kColTileRows - 1) / kColTileRows), static_cast<unsigned>(n));
    blur_cols_tiled<T><<<cg, cb, col_shared, stream>>>(tmp.get(), out, h, w, ky, ry, border);
  } else {
    const dim3 cb(32, 8);
    const dim3 cg(static_cast<unsigned>((w + 31) / 32), static_cast<unsigned>((h + 7) / 8), static_cast<unsigned>(n));
    blur_cols_direct<T><<<cg, cb, 0, stream>>>(tmp.get(), out, h, w, ky, ry, border);
  }
  GF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void gaussian_blur_cuda_raw(const void* in, void* out, DType dtype, std::int64_t n, std::int64_t h, std::int64_t w,
                            const BlurPlan& plan, cudaStream_t stream) {
  GFK_CHECK_ARG(plan.kx.size() / 2 <= kMaxCudaRadius && plan.ky.size() / 2 <= kMaxCudaRadius,
               "gaussian_blur: a {}x{} kernel is too large for the CUDA backend (at most {} taps per direction); "
               "use a CPU array",
               plan.kx.size(), plan.ky.size(), 2 * kMaxCudaRadius + 1);
  GFK_CHECK_ARG(n <= 65535 && (n * h + kRowThreadsY - 1) / kRowThreadsY <= 65535,
               "gaussian_blur: a batch of {} images of {} rows is too large for one CUDA launch (at most 262140 rows "
               "in all); split the batch",
               n, h);
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
