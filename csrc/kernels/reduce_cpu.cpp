// normalize_minmax and mean on the CPU: per-chunk partial results in parallel, combined in order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/error.h"
#include "kernels/parallel.h"
#include "kernels/reduce.h"

namespace gpufleet::kernels {

namespace {

constexpr std::int64_t kChunk = 1 << 16;

template <class T, class F>
void for_each_dtype(const ArrayRef& a, F&& f) {
  switch (a.dtype) {
    case DType::U8: f(a.ptr<const std::uint8_t>()); break;
    case DType::I32: f(a.ptr<const std::int32_t>()); break;
    case DType::I64: f(a.ptr<const std::int64_t>()); break;
    case DType::F32: f(a.ptr<const float>()); break;
    case DType::F64: f(a.ptr<const double>()); break;
  }
}

// Splits `groups` blocks of `len` values into chunks of at most kChunk values: (group, begin, end).
struct Chunks {
  std::int64_t len, per_group;
  Chunks(std::int64_t total, std::int64_t groups) : len(total / groups), per_group((len + kChunk - 1) / kChunk) {}
  std::int64_t count(std::int64_t groups) const { return groups * per_group; }
  std::int64_t group(std::int64_t c) const { return c / per_group; }
  std::int64_t begin(std::int64_t c) const { return group(c) * len + (c % per_group) * kChunk; }
  std::int64_t end(std::int64_t c) const { return std::min(begin(c) + kChunk, (group(c) + 1) * len); }
};

}  // namespace

std::int64_t normalize_minmax_cpu(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  const Chunks ch(in.numel(), groups);
  const std::int64_t nchunks = ch.count(groups);
  std::vector<float> lo(nchunks), hi(nchunks);
  std::vector<std::int64_t> nan_at(nchunks, -1);
  for_each_dtype<void>(in, [&](const auto* x) {
    parallel_for(nchunks, 1, [&](std::int64_t c0, std::int64_t c1) {
      for (std::int64_t c = c0; c < c1; ++c) {
        float mn = std::numeric_limits<float>::infinity(), mx = -mn;
        for (std::int64_t i = ch.begin(c); i < ch.end(c); ++i) {
          const float v = static_cast<float>(x[i]);
          if (v != v) {
            nan_at[c] = i;
            break;
          }
          mn = std::min(mn, v);
          mx = std::max(mx, v);
        }
        lo[c] = mn;
        hi[c] = mx;
      }
    });
  });
  for (std::int64_t c = 0; c < nchunks; ++c)  // chunks in order: the first one found is the first NaN
    if (nan_at[c] >= 0) return nan_at[c];
  std::vector<float> glo(groups, std::numeric_limits<float>::infinity()), ghi(groups, -std::numeric_limits<float>::infinity());
  for (std::int64_t c = 0; c < nchunks; ++c) {
    glo[ch.group(c)] = std::min(glo[ch.group(c)], lo[c]);
    ghi[ch.group(c)] = std::max(ghi[ch.group(c)], hi[c]);
  }
  for_each_dtype<void>(in, [&](const auto* x) {
    parallel_for(nchunks, 1, [&](std::int64_t c0, std::int64_t c1) {
      for (std::int64_t c = c0; c < c1; ++c) {
        const float mn = glo[ch.group(c)], mx = ghi[ch.group(c)];
        if (out.dtype == DType::U8) {
          std::uint8_t* o = out.ptr<std::uint8_t>();
          for (std::int64_t i = ch.begin(c); i < ch.end(c); ++i)
            o[i] = static_cast<std::uint8_t>(minmax_scale(static_cast<float>(x[i]), mn, mx));
        } else {
          float* o = out.ptr<float>();
          for (std::int64_t i = ch.begin(c); i < ch.end(c); ++i) o[i] = minmax_scale(static_cast<float>(x[i]), mn, mx);
        }
      }
    });
  });
  return -1;
}

void mean_cpu(const ArrayRef& in, const ArrayRef& out, std::int64_t groups) {
  const Chunks ch(in.numel(), groups);
  const std::int64_t nchunks = ch.count(groups);
  std::vector<double> part(nchunks);
  for_each_dtype<void>(in, [&](const auto* x) {
    parallel_for(nchunks, 1, [&](std::int64_t c0, std::int64_t c1) {
      for (std::int64_t c = c0; c < c1; ++c) {
        // Four partial sums: vectorisable and a little more accurate than one running sum.
        double s[4] = {0, 0, 0, 0};
        std::int64_t i = ch.begin(c);
        const std::int64_t e = ch.end(c);
        for (; i + 4 <= e; i += 4)
          for (int t = 0; t < 4; ++t) s[t] += static_cast<double>(x[i + t]);
        for (; i < e; ++i) s[0] += static_cast<double>(x[i]);
        part[c] = (s[0] + s[1]) + (s[2] + s[3]);
      }
    });
  });
  double* o = out.ptr<double>();
  std::vector<double> sum(groups, 0.0);
  for (std::int64_t c = 0; c < nchunks; ++c) sum[ch.group(c)] += part[c];
  for (std::int64_t g = 0; g < groups; ++g) o[g] = sum[g] / static_cast<double>(ch.len);
}

}  // namespace gpufleet::kernels
