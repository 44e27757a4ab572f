#pragma once
/// Internal pieces of the CPU canny, shared with the fused congestion chain.
#include <cstdint>
#include <vector>

#include "kernels/canny.h"

namespace gpufleet::kernels {

/// Sobel + non-maximum suppression of rows [y0, y1) of one h x w image into `map` (the whole image's
/// map; 0 not an edge, 1 candidate, 2 strong). Appends the flat indices of the strong pixels to `strong`.
void canny_classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                         const CannyThresholds& t, bool l2, std::uint8_t* map, std::vector<std::int64_t>& strong);

/// Marks every candidate (1) 8-connected to a strong pixel (2) as strong, in place, growing from the
/// strong pixels listed in `seeds` (each band's list, in any order).
void canny_hysteresis(std::uint8_t* map, std::int64_t h, std::int64_t w,
                      const std::vector<const std::vector<std::int64_t>*>& seeds);

/// The whole CPU canny of a batch into `map` (0/1/2 before hysteresis, 0/2 after); bands in parallel,
/// then hysteresis per image in parallel.
void canny_map_cpu(const std::uint8_t* src, std::int64_t n, std::int64_t h, std::int64_t w, const CannyThresholds& t,
                   bool l2, std::uint8_t* map);

}  // namespace gpufleet::kernels
