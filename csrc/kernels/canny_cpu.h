#pragma once
/// Internal pieces of the CPU canny, shared with the fused congestion chain.
#include <cstdint>
#include <vector>

#include "kernels/canny.h"

namespace gpufleet::kernels {

/// Sobel + non-maximum suppression of rows [y0, y1) of one h x w image into `map` (the whole image's
/// map; 0 not an edge, 1 candidate, 2 strong). Appends the strong pixels, packed as (y << 32) | x, to
/// `strong`.
void canny_classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                         const CannyThresholds& t, bool l2, std::uint8_t* map, std::vector<std::uint64_t>& strong);

/// Hysteresis: marks every candidate (1) 8-connected to a pixel on `stack` (packed, already 2) as
/// strong, in place, looking only at rows [y0, y1); empties `stack`. With `rim`, the pixels whose
/// neighbourhood reaches past y0 or y1 (inside the image) are appended to it, to grow again later
/// over the whole image.
void canny_grow(std::uint8_t* map, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                std::vector<std::uint64_t>& stack, std::vector<std::uint64_t>* rim);

/// The whole CPU canny of a batch into `map` (0 not an edge, 1 candidate left out, 2 edge): row bands
/// classified and grown in parallel, then the growth across bands per image in parallel.
void canny_map_cpu(const std::uint8_t* src, std::int64_t n, std::int64_t h, std::int64_t w, const CannyThresholds& t,
                   bool l2, std::uint8_t* map);

}  // namespace gpufleet::kernels
