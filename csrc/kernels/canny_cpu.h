#pragma once
/// Internal pieces of the CPU canny, shared with the fused congestion chain.
#include <cstdint>

#include "kernels/canny.h"

namespace gpufleet::kernels {

/// Sobel + non-maximum suppression of rows [y0, y1) of one h x w image into `map` (the whole image's
/// map; 0 not an edge, 1 candidate, 2 strong).
void canny_classify_band(const std::uint8_t* img, std::int64_t h, std::int64_t w, std::int64_t y0, std::int64_t y1,
                         const CannyThresholds& t, bool l2, std::uint8_t* map);

/// Marks every candidate (1) 8-connected to a strong pixel (2) as strong, in place.
void canny_hysteresis(std::uint8_t* map, std::int64_t h, std::int64_t w);

}  // namespace gpufleet::kernels
