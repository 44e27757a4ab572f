// kmeans1d on the CPU: exact dynamic programming (Note [Exact 1-D k-means]) or k-means++ / Lloyd,
// both on sorted weighted distinct values (the 256-bin histogram for uint8).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "common/error.h"
#include "device/random.h"
#include "kernels/kmeans1d.h"
#include "kernels/parallel.h"

namespace gpufleet::kernels {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Weighted {
  std::vector<double> x, w;  // ascending distinct values and their counts
};

// Prefix sums of w, w*(x-shift), w*(x-shift)^2 for O(1) segment costs.
struct Prefix {
  std::vector<double> w, s1, s2;
  double shift = 0;
  explicit Prefix(const Weighted& d) {
    const std::size_t n = d.x.size();
    double tw = 0, tx = 0;
    for (std::size_t i = 0; i < n; ++i) {
      tw += d.w[i];
      tx += d.w[i] * d.x[i];
    }
    shift = tx / tw;
    w.assign(n + 1, 0);
    s1.assign(n + 1, 0);
    s2.assign(n + 1, 0);
    for (std::size_t i = 0; i < n; ++i) {
      const double c = d.x[i] - shift;
      w[i + 1] = w[i] + d.w[i];
      s1[i + 1] = s1[i] + d.w[i] * c;
      s2[i + 1] = s2[i] + d.w[i] * c * c;
    }
  }
  // Sum of squared deviations of the values i..j (inclusive) from their mean.
  double cost(std::size_t i, std::size_t j) const {
    const double ww = w[j + 1] - w[i], a = s1[j + 1] - s1[i];
    const double c = (s2[j + 1] - s2[i]) - a * a / ww;
    return c > 0 ? c : 0;
  }
  double mean(std::size_t i, std::size_t j) const { return (s1[j + 1] - s1[i]) / (w[j + 1] - w[i]) + shift; }
};

std::vector<double> exact_centres(const Weighted& d, int k) {
  const std::size_t n = d.x.size();
  if (static_cast<std::size_t>(k) >= n) return d.x;
  const Prefix p(d);
  std::vector<double> prev(n), cur(n);
  std::vector<std::vector<std::uint32_t>> arg(k, std::vector<std::uint32_t>(n, 0));
  for (std::size_t j = 0; j < n; ++j) prev[j] = p.cost(0, j);
  for (int m = 1; m < k; ++m) {
    // cur[j] = min over i in [m, j] of prev[i-1] + cost(i, j); argmin monotone in j.
    auto& a = arg[m];
    struct Range {
      std::size_t jlo, jhi, ilo, ihi;
    };
    std::vector<Range> todo{{static_cast<std::size_t>(m), n - 1, static_cast<std::size_t>(m), n - 1}};
    while (!todo.empty()) {
      const Range r = todo.back();
      todo.pop_back();
      const std::size_t jm = r.jlo + (r.jhi - r.jlo) / 2;
      const std::size_t lo = std::max<std::size_t>(r.ilo, m), hi = std::min(r.ihi, jm);
      double best = std::numeric_limits<double>::infinity();
      std::size_t bi = lo;
      for (std::size_t i = lo; i <= hi; ++i) {
        const double v = prev[i - 1] + p.cost(i, jm);
        if (v < best) {
          best = v;
          bi = i;
        }
      }
      cur[jm] = best;
      a[jm] = static_cast<std::uint32_t>(bi);
      if (jm > r.jlo) todo.push_back({r.jlo, jm - 1, r.ilo, bi});
      if (jm < r.jhi) todo.push_back({jm + 1, r.jhi, bi, r.ihi});
    }
    std::swap(prev, cur);
  }
  std::vector<double> centres(k);
  std::size_t j = n - 1;
  for (int m = k - 1; m >= 0; --m) {
    const std::size_t i = m == 0 ? 0 : arg[m][j];
    centres[m] = p.mean(i, j);
    if (m > 0) j = i - 1;
  }
  return centres;
}

// Uniform double in [0, 1) from a counter-based stream.
struct Rng {
  std::uint64_t seed, counter = 0;
  double uniform() { return static_cast<double>(mix64(seed, counter++) >> 11) * 0x1.0p-53; }
};

// Index of the first value whose cumulative weight exceeds u * total.
std::size_t sample_index(const std::vector<double>& cum, double u) {
  const double target = u * cum.back();
  auto it = std::upper_bound(cum.begin(), cum.end(), target);
  return std::min<std::size_t>(it - cum.begin(), cum.size() - 1);
}

struct LloydResult {
  std::vector<double> centres;
  double inertia = 0;
};

// Assign by midpoints over sorted x: cluster c holds [start[c], start[c+1]).
void assign(const Weighted& d, const std::vector<double>& c, std::vector<std::size_t>& start) {
  const int k = static_cast<int>(c.size());
  start.assign(k + 1, 0);
  start[k] = d.x.size();
  for (int i = 1; i < k; ++i) {
    const double mid = 0.5 * (c[i - 1] + c[i]);
    start[i] = std::upper_bound(d.x.begin(), d.x.end(), mid) - d.x.begin();  // x <= mid goes to i-1
  }
}

LloydResult lloyd_once(const Weighted& d, const Prefix& p, int k, Rng& rng, int max_iter, double tol_abs) {
  const std::size_t n = d.x.size();
  // k-means++ (greedy, as scikit-learn: 2 + log(k) candidates per step, keep the best).
  std::vector<double> cum(n);
  std::partial_sum(d.w.begin(), d.w.end(), cum.begin());
  std::vector<double> centres{d.x[sample_index(cum, rng.uniform())]};
  std::vector<double> dist(n);
  for (std::size_t i = 0; i < n; ++i) dist[i] = (d.x[i] - centres[0]) * (d.x[i] - centres[0]);
  const int trials = 2 + static_cast<int>(std::log(static_cast<double>(k)));
  for (int c = 1; c < k; ++c) {
    for (std::size_t i = 0; i < n; ++i) cum[i] = (i ? cum[i - 1] : 0) + d.w[i] * dist[i];
    double best_pot = std::numeric_limits<double>::infinity();
    std::size_t best = 0;
    for (int t = 0; t < trials; ++t) {
      const std::size_t cand = cum.back() > 0 ? sample_index(cum, rng.uniform()) : 0;
      double pot = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const double dd = (d.x[i] - d.x[cand]) * (d.x[i] - d.x[cand]);
        pot += d.w[i] * std::min(dist[i], dd);
      }
      if (pot < best_pot) {
        best_pot = pot;
        best = cand;
      }
    }
    centres.push_back(d.x[best]);
    for (std::size_t i = 0; i < n; ++i) dist[i] = std::min(dist[i], (d.x[i] - d.x[best]) * (d.x[i] - d.x[best]));
  }
  std::sort(centres.begin(), centres.end());
  std::vector<std::size_t> start;
  for (int it = 0; it < max_iter; ++it) {
    assign(d, centres, start);
    double shift = 0;
    for (int c = 0; c < k; ++c) {
      if (start[c + 1] == start[c]) continue;  // an empty cluster keeps its centre
      const double m = p.mean(start[c], start[c + 1] - 1);
      shift += (m - centres[c]) * (m - centres[c]);
      centres[c] = m;
    }
    std::sort(centres.begin(), centres.end());
    if (shift <= tol_abs) break;
  }
  assign(d, centres, start);
  LloydResult r{centres, 0};
  for (int c = 0; c < k; ++c)
    for (std::size_t i = start[c]; i < start[c + 1]; ++i) r.inertia += d.w[i] * (d.x[i] - centres[c]) * (d.x[i] - centres[c]);
  return r;
}

std::vector<double> lloyd_centres(const Weighted& d, int k, const KMeansArgs& a, std::uint64_t seed) {
  if (static_cast<std::size_t>(k) >= d.x.size()) return d.x;
  const Prefix p(d);
  const double variance = p.cost(0, d.x.size() - 1) / p.w.back();
  Rng rng{seed};
  LloydResult best;
  best.inertia = std::numeric_limits<double>::infinity();
  for (int r = 0; r < a.n_init; ++r) {
    LloydResult res = lloyd_once(d, p, k, rng, a.max_iter, a.tol * variance);
    if (res.inertia < best.inertia) best = std::move(res);
  }
  return best.centres;
}

template <class T>
void check_finite(const T* v, std::int64_t n) {
  if constexpr (std::is_floating_point_v<T>) {
    for (std::int64_t i = 0; i < n; ++i)
      GF_CHECK_ARG(std::isfinite(v[i]), "kmeans1d: value {} at flat index {} is not finite: expected finite values",
                   static_cast<double>(v[i]), i);
  }
}

// The weighted distinct values of values[0..n) (or of a uniform random sample of `count` of them).
template <class T>
Weighted gather(const T* v, std::int64_t n, std::int64_t count, Rng& rng) {
  Weighted d;
  if constexpr (std::is_same_v<T, std::uint8_t>) {
    std::int64_t hist[256] = {};
    if (count == n) {
      for (std::int64_t i = 0; i < n; ++i) ++hist[v[i]];
    } else {
      // Selection sampling (Knuth's algorithm S): each index kept with probability needed / remaining.
      std::int64_t needed = count;
      for (std::int64_t i = 0; i < n && needed > 0; ++i)
        if (rng.uniform() * static_cast<double>(n - i) < static_cast<double>(needed)) {
          ++hist[v[i]];
          --needed;
        }
    }
    for (int b = 0; b < 256; ++b)
      if (hist[b]) {
        d.x.push_back(b);
        d.w.push_back(static_cast<double>(hist[b]));
      }
  } else {
    std::vector<double> s;
    s.reserve(count);
    if (count == n) {
      for (std::int64_t i = 0; i < n; ++i) s.push_back(static_cast<double>(v[i]));
    } else {
      std::int64_t needed = count;
      for (std::int64_t i = 0; i < n && needed > 0; ++i)
        if (rng.uniform() * static_cast<double>(n - i) < static_cast<double>(needed)) {
          s.push_back(static_cast<double>(v[i]));
          --needed;
        }
    }
    std::sort(s.begin(), s.end());
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (!d.x.empty() && d.x.back() == s[i]) {
        d.w.back() += 1;
      } else {
        d.x.push_back(s[i]);
        d.w.push_back(1);
      }
    }
  }
  return d;
}

}  // namespace

std::vector<double> kmeans1d_exact_weighted(const std::vector<double>& x, const std::vector<double>& w, int k) {
  GF_CHECK_ARG(!x.empty() && x.size() == w.size(), "kmeans1d_exact_weighted: {} values and {} weights", x.size(), w.size());
  Weighted d{x, w};
  return exact_centres(d, std::min<int>(k, static_cast<int>(x.size())));
}

template <class T>
int kmeans1d_cpu_one(const T* values, std::int64_t n, const KMeansArgs& a, std::uint64_t seed, std::int32_t* labels,
                     double* centres_out, double* inertia) {
  check_finite(values, n);
  Rng rng{seed ^ 0x5851f42d4c957f2dULL};
  const std::int64_t count =
      a.sample > 0 ? std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(n) * a.sample)) : n;
  const Weighted d = gather(values, n, std::min(count, n), rng);
  const int k = std::min<int>(a.k, static_cast<int>(d.x.size()));
  const std::vector<double> c = a.method == KMeansMethod::Exact ? exact_centres(d, k) : lloyd_centres(d, k, a, seed);
  for (int i = 0; i < a.k; ++i) centres_out[i] = i < k ? c[i] : kNaN;
  double total = 0;
  if constexpr (std::is_same_v<T, std::uint8_t>) {
    std::int32_t lut[256];
    kmeans_label_lut(c.data(), k, lut);
    double sq[256];
    for (int v = 0; v < 256; ++v) sq[v] = (v - c[lut[v]]) * (v - c[lut[v]]);
    std::int64_t hist[256] = {};
    for (std::int64_t i = 0; i < n; ++i) {
      labels[i] = lut[values[i]];
      ++hist[values[i]];
    }
    for (int v = 0; v < 256; ++v) total += static_cast<double>(hist[v]) * sq[v];
  } else {
    std::vector<double> mids(k > 1 ? k - 1 : 0);
    for (int i = 0; i + 1 < k; ++i) mids[i] = 0.5 * (c[i] + c[i + 1]);
    for (std::int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(values[i]);
      const int l = static_cast<int>(std::lower_bound(mids.begin(), mids.end(), v) - mids.begin());
      labels[i] = l;
      total += (v - c[l]) * (v - c[l]);
    }
  }
  *inertia = total;
  return k;
}

template int kmeans1d_cpu_one<std::uint8_t>(const std::uint8_t*, std::int64_t, const KMeansArgs&, std::uint64_t,
                                            std::int32_t*, double*, double*);
template int kmeans1d_cpu_one<float>(const float*, std::int64_t, const KMeansArgs&, std::uint64_t, std::int32_t*,
                                     double*, double*);
template int kmeans1d_cpu_one<double>(const double*, std::int64_t, const KMeansArgs&, std::uint64_t, std::int32_t*,
                                      double*, double*);

void kmeans1d_cpu(const ArrayRef& values, const KMeansOut& out, const KMeansArgs& a, bool per_image) {
  const std::int64_t problems = per_image && values.ndim() == 3 ? values.shape[0] : 1;
  const std::int64_t n = values.numel() / problems;
  const std::uint64_t seed = a.seed ? *a.seed : std::random_device{}() * 0x9E3779B97F4A7C15ULL ^ std::random_device{}();
  parallel_for(problems, 1, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::uint64_t s = mix64(seed, static_cast<std::uint64_t>(p));
      std::int32_t* labels = out.labels.ptr<std::int32_t>() + p * n;
      double* centres = out.centres.ptr<double>() + p * a.k;
      double* inertia = out.inertia.ptr<double>() + p;
      int k = 0;
      switch (values.dtype) {
        case DType::U8: k = kmeans1d_cpu_one(values.ptr<const std::uint8_t>() + p * n, n, a, s, labels, centres, inertia); break;
        case DType::F32: k = kmeans1d_cpu_one(values.ptr<const float>() + p * n, n, a, s, labels, centres, inertia); break;
        case DType::F64: k = kmeans1d_cpu_one(values.ptr<const double>() + p * n, n, a, s, labels, centres, inertia); break;
        default: GF_ASSERT(false, "dtype {}", dtype_name(values.dtype));
      }
      out.clusters.ptr<std::int32_t>()[p] = k;
    }
  });
}

}  // namespace gpufleet::kernels
