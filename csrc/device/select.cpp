#include "device/select.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "common/error.h"
#include "common/units.h"

namespace gpufleet {

SelectOrder parse_select_order(const std::string& text) {
  if (text == "free_memory") return SelectOrder::FreeMemory;
  if (text == "utilization") return SelectOrder::Utilization;
  if (text == "index") return SelectOrder::Index;
  throw std::invalid_argument(fmt::format(
      "invalid order '{}': expected 'free_memory' (most free first), 'utilization' (least busy first) or "
      "'index' (lowest ordinal first)",
      text));
}

namespace {

void validate(const SelectOptions& o) {
  GF_CHECK_ARG(o.n >= 0, "n must be a non-negative number of devices, got {}", o.n);
  GF_CHECK_ARG(!o.max_utilization || (*o.max_utilization >= 0 && *o.max_utilization <= 100),
               "max_utilization must be a percentage from 0 to 100, got {}", o.max_utilization.value_or(0));
  GF_CHECK_ARG(!o.timeout_s || *o.timeout_s >= 0, "timeout must be a non-negative number of seconds, got {}",
               o.timeout_s.value_or(0));
  GF_CHECK_ARG(o.poll_interval_s > 0, "poll interval must be positive, got {}", o.poll_interval_s);
}

std::string describe(const DeviceInfo& d) {
  return fmt::format("cuda:{} ({}{})", d.ordinal, d.name.empty() ? "unknown GPU" : d.name,
                     d.nvml_index >= 0 ? fmt::format(", physical {}", d.nvml_index) : "");
}

std::string options_text(const SelectOptions& o) {
  std::string s = fmt::format("n={}", o.n);
  if (o.min_free_memory) s += fmt::format(", min_free_memory={}", format_memory_size(*o.min_free_memory));
  if (o.max_utilization) s += fmt::format(", max_utilization={}%", *o.max_utilization);
  if (!o.exclude.empty()) s += fmt::format(", exclude={}", fmt::join(o.exclude, ","));
  return s;
}

}  // namespace

Selection evaluate_selection(const std::vector<DeviceInfo>& devices, const SelectOptions& o) {
  validate(o);
  Selection sel;
  std::vector<const DeviceInfo*> ok;
  for (const auto& d : devices) {
    Verdict v{d, false, ""};
    if (std::find(o.exclude.begin(), o.exclude.end(), d.ordinal) != o.exclude.end()) {
      v.reason = "excluded";
    } else if (o.min_free_memory && !d.free_memory) {
      v.reason = "free memory unknown (NVML unavailable)";
    } else if (o.min_free_memory && *d.free_memory < *o.min_free_memory) {
      v.reason = fmt::format("{} free < {} required", format_memory_size(*d.free_memory),
                             format_memory_size(*o.min_free_memory));
    } else if (o.max_utilization && !d.utilization) {
      v.reason = "utilization unknown (NVML unavailable)";
    } else if (o.max_utilization && *d.utilization > *o.max_utilization) {
      v.reason = fmt::format("{}% busy > {}% allowed", *d.utilization, *o.max_utilization);
    } else {
      v.qualifies = true;
      v.reason = fmt::format("ok: {} free, {} busy",
                             d.free_memory ? format_memory_size(*d.free_memory) : "unknown",
                             d.utilization ? fmt::format("{}%", *d.utilization) : "unknown");
      ok.push_back(&d);
    }
    sel.verdicts.push_back(std::move(v));
  }
  auto free_of = [](const DeviceInfo* d) { return d->free_memory.value_or(0); };
  auto util_of = [](const DeviceInfo* d) { return d->utilization.value_or(101); };
  std::stable_sort(ok.begin(), ok.end(), [&](const DeviceInfo* a, const DeviceInfo* b) {
    switch (o.order) {
      case SelectOrder::FreeMemory:
        if (free_of(a) != free_of(b)) return free_of(a) > free_of(b);
        return a->ordinal < b->ordinal;
      case SelectOrder::Utilization:
        if (util_of(a) != util_of(b)) return util_of(a) < util_of(b);
        if (free_of(a) != free_of(b)) return free_of(a) > free_of(b);
        return a->ordinal < b->ordinal;
      case SelectOrder::Index:
        return a->ordinal < b->ordinal;
    }
    return false;
  });
  for (std::size_t i = 0; i < ok.size() && static_cast<int>(i) < o.n; ++i) sel.chosen.push_back(ok[i]->ordinal);
  return sel;
}

std::vector<int> select_devices(const SelectOptions& o, const std::function<void()>& check_interrupt,
                                const std::function<std::vector<DeviceInfo>()>& discover_fn) {
  validate(o);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  while (true) {
    const auto snapshot = discover_fn ? discover_fn() : devices();
    Selection sel = evaluate_selection(snapshot, o);
    if (static_cast<int>(sel.chosen.size()) >= o.n) return sel.chosen;

    const double waited = std::chrono::duration<double>(clock::now() - start).count();
    const bool timed_out = o.wait && o.timeout_s && waited >= *o.timeout_s;
    if (!o.wait || timed_out) {
      const int qualifying = static_cast<int>(
          std::count_if(sel.verdicts.begin(), sel.verdicts.end(), [](const Verdict& v) { return v.qualifies; }));
      std::string msg = fmt::format("select_devices({}): {} of {} visible device{} qualif{}, {} needed",
                                    options_text(o), qualifying, snapshot.size(), snapshot.size() == 1 ? "" : "s",
                                    qualifying == 1 ? "ies" : "y", o.n);
      if (timed_out) msg += fmt::format(" (gave up after waiting {:.1f} s)", waited);
      if (snapshot.empty()) msg += "; no GPU is visible (see `gpufleet info`)";
      for (const auto& v : sel.verdicts) msg += fmt::format("\n  {}: {}", describe(v.info), v.reason);
      throw DeviceSelectionError(msg, timed_out);
    }
    double sleep_s = o.poll_interval_s;
    if (o.timeout_s) sleep_s = std::min(sleep_s, std::max(0.0, *o.timeout_s - waited));
    // Sleep in short steps so an interrupt is noticed quickly.
    const auto until = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(sleep_s));
    while (clock::now() < until) {
      if (check_interrupt) check_interrupt();
      std::this_thread::sleep_for(std::min<clock::duration>(std::chrono::milliseconds(50), until - clock::now()));
    }
    if (check_interrupt) check_interrupt();
  }
}

}  // namespace gpufleet
