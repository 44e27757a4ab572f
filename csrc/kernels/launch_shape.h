#pragma once
/// Launch shapes of the CUDA kernels as plain host arithmetic (no CUDA headers), so the C++ tests
/// check them on machines without a GPU (tests/cpp/test_kernels.cpp, KernelsLaunchShape).
///
/// Note [Grid-stride launches]: CUDA caps a grid at 65,535 blocks along y and z (2^31 - 1 along x). No
/// kernel here derives a batch or row limit from that: a dimension that would need more blocks gets
/// at most its cap, and the kernel loops over the rest (`for (b = blockIdx.y; b < count; b +=
/// gridDim.y)`). Every loop bound is the same for all threads of a block, so the __syncthreads()
/// inside such loops are never divergent. What remains are limits of the algorithms themselves
/// (Canny's int32 worklist: 2^31 pixels per image; the blur's shared tiles: radius 1,100; k-means'
/// shared table: k <= 32), checked before anything is queued.
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace gpufleet::kernels {

inline constexpr std::int64_t kMaxGridX = 2147483647;
inline constexpr std::int64_t kMaxGridYZ = 65535;

struct Dim {
  unsigned x = 1, y = 1, z = 1;
};

struct Launch {
  Dim grid, block;
  std::size_t shared = 0;  ///< dynamic shared memory in bytes
};

/// ceil(n / per).
constexpr std::int64_t ceil_div(std::int64_t n, std::int64_t per) { return (n + per - 1) / per; }

/// Blocks to launch along one grid dimension for `count` blocks of work: at least 1, at most `cap`
/// (the kernel's grid-stride loop covers the rest).
constexpr unsigned grid_dim(std::int64_t count, std::int64_t cap = kMaxGridYZ) {
  return static_cast<unsigned>(std::clamp<std::int64_t>(count, 1, cap));
}

// ---- gaussian_blur (gaussian_blur_cuda.cu) -----------------------------------------------------------
inline constexpr int kRowThreadsX = 128, kRowThreadsY = 4;
inline constexpr int kColThreadsX = 32, kColThreadsY = 8, kColRowsPerThread = 8;
inline constexpr int kColTileRows = kColThreadsY * kColRowsPerThread;  ///< output rows per column block
inline constexpr std::size_t kMaxShared = 48 * 1024;                    ///< without opting in to more

/// Row pass over `rows` rows (all images stacked) of width `w`, radius `r`: x over column tiles, y over
/// groups of kRowThreadsY rows. Shared: one tile row of (kRowThreadsX + 2r) floats per thread row.
constexpr Launch blur_rows_launch(std::int64_t rows, std::int64_t w, int r) {
  Launch l;
  l.block = {kRowThreadsX, kRowThreadsY, 1};
  l.grid = {grid_dim(ceil_div(w, kRowThreadsX), kMaxGridX), grid_dim(ceil_div(rows, kRowThreadsY)), 1};
  l.shared = sizeof(float) * static_cast<std::size_t>(kRowThreadsY) * (kRowThreadsX + 2 * static_cast<std::size_t>(r));
  return l;
}

/// Column pass over n images of h x w, radius `r`. Tiled (shared memory) when the tile fits,
/// otherwise the direct kernel reading columns from global memory.
constexpr std::size_t blur_cols_shared(int r) {
  return sizeof(float) * (kColTileRows + 2 * static_cast<std::size_t>(r)) * kColThreadsX;
}
constexpr bool blur_cols_use_tile(int r) { return blur_cols_shared(r) <= kMaxShared; }
constexpr Launch blur_cols_launch(std::int64_t n, std::int64_t h, std::int64_t w, int r) {
  Launch l;
  if (blur_cols_use_tile(r)) {
    l.block = {kColThreadsX, kColThreadsY, 1};
    l.grid = {grid_dim(ceil_div(w, kColThreadsX), kMaxGridX), grid_dim(ceil_div(h, kColTileRows)), grid_dim(n)};
    l.shared = blur_cols_shared(r);
  } else {
    l.block = {32, 8, 1};
    l.grid = {grid_dim(ceil_div(w, 32), kMaxGridX), grid_dim(ceil_div(h, 8)), grid_dim(n)};
  }
  return l;
}

// ---- canny (canny_cuda.cu) ---------------------------------------------------------------------------
inline constexpr int kCannyTX = 32, kCannyTY = 8;
inline constexpr int kHysteresisThreads = 1024;

/// Classification: 32 x 8 tiles, x over tile columns, y over tile rows, z over images.
constexpr Launch canny_classify_launch(std::int64_t n, std::int64_t h, std::int64_t w) {
  Launch l;
  l.block = {kCannyTX, kCannyTY, 1};
  l.grid = {grid_dim(ceil_div(w, kCannyTX), kMaxGridX), grid_dim(ceil_div(h, kCannyTY)), grid_dim(n)};
  return l;
}

// ---- per-group reductions (reduce, k-means histogram, congestion score) ----------------------------------
inline constexpr int kReduceThreads = 256;
inline constexpr int kBlocksPerGroup = 64;

/// `groups` groups of `len` values: x over at most kBlocksPerGroup blocks per group (each writes one
/// partial result), y over groups. Partial results: groups * grid.x (partials_per_group).
constexpr Launch per_group_launch(std::int64_t groups, std::int64_t len) {
  Launch l;
  l.block = {kReduceThreads, 1, 1};
  l.grid = {grid_dim(ceil_div(len, kReduceThreads), kBlocksPerGroup), grid_dim(groups), 1};
  return l;
}

/// One block per group for the combining passes (x allows 2^31 - 1 groups; more loop).
constexpr Launch per_group_final_launch(std::int64_t groups, unsigned threads) {
  Launch l;
  l.block = {threads, 1, 1};
  l.grid = {grid_dim(groups, kMaxGridX), 1, 1};
  return l;
}

/// A flat grid-stride loop over `n` elements.
constexpr Launch flat_launch(std::int64_t n, unsigned threads = 256) {
  Launch l;
  l.block = {threads, 1, 1};
  l.grid = {grid_dim(ceil_div(n, threads), 65535 * 16), 1, 1};
  return l;
}

}  // namespace gpufleet::kernels
