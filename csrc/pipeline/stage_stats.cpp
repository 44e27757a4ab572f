#include "pipeline/stage_stats.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "common/error.h"

namespace gpufleet::pipeline {

StageStats::StageStats(std::string name, int workers, std::size_t max_spans_per_worker) : name_(std::move(name)) {
  GF_CHECK_ARG(workers >= 1, "stage '{}' needs at least 1 worker, got {}", name_, workers);
  for (int i = 0; i < workers; ++i) clocks_.push_back(std::make_unique<WorkerClock>(max_spans_per_worker));
}

WorkerClock& StageStats::clock(int i) {
  if (i < 0 || i >= workers())
    throw std::out_of_range(fmt::format("stage '{}' has workers 0..{}, got worker {}", name_, workers() - 1, i));
  return *clocks_[static_cast<std::size_t>(i)];
}

const WorkerClock& StageStats::clock(int i) const { return const_cast<StageStats*>(this)->clock(i); }

double StageStats::mean_batch_size() const {
  const auto b = batches();
  return b == 0 ? 0.0 : static_cast<double>(batch_items()) / static_cast<double>(b);
}

WorkerTotals StageStats::totals() const {
  WorkerTotals sum;
  bool first = true;
  for (const auto& c : clocks_) {
    const WorkerTotals t = c->totals();
    sum.busy_ns += t.busy_ns;
    sum.starved_ns += t.starved_ns;
    sum.blocked_ns += t.blocked_ns;
    if (t.state == WorkerState::Idle) continue;
    sum.start_ns = first ? t.start_ns : std::min(sum.start_ns, t.start_ns);
    sum.end_ns = first ? t.end_ns : std::max(sum.end_ns, t.end_ns);
    first = false;
  }
  return sum;
}

double StageStats::utilization() const {
  std::int64_t busy = 0, wall = 0;
  for (const auto& c : clocks_) {
    const WorkerTotals t = c->totals();
    busy += t.busy_ns;
    wall += t.wall_ns();
  }
  return wall <= 0 ? 0.0 : std::clamp(static_cast<double>(busy) / static_cast<double>(wall), 0.0, 1.0);
}

int limiting_stage(const std::vector<const StageStats*>& stages) {
  int best = -1;
  double best_u = -1;
  for (std::size_t i = 0; i < stages.size(); ++i) {
    GF_CHECK_ARG(stages[i] != nullptr, "limiting_stage: stage {} is null", i);
    if (stages[i]->totals().wall_ns() <= 0) continue;
    const double u = stages[i]->utilization();
    if (u > best_u + 1e-9) {
      best_u = u;
      best = static_cast<int>(i);
    }
  }
  return best;
}

Monitor::Monitor(double interval_s, std::size_t max_samples) : interval_s_(interval_s), max_samples_(max_samples) {
  GF_CHECK_ARG(interval_s > 0, "sample interval must be positive seconds, got {}", interval_s);
  GF_CHECK_ARG(max_samples >= 2, "max_samples must be at least 2, got {}", max_samples);
}

Monitor::~Monitor() { stop(); }

int Monitor::add_probe(std::string name, std::function<double()> probe) {
  std::lock_guard lock(mutex_);
  GF_CHECK_ARG(!running_, "probe '{}' added after the monitor started", name);
  names_.push_back(std::move(name));
  probes_.push_back(std::move(probe));
  return static_cast<int>(names_.size()) - 1;
}

void Monitor::start() {
  std::lock_guard lock(mutex_);
  if (running_ || stopping_) return;
  running_ = true;
  start_ns_ = now_ns();
  thread_ = std::thread([this] { loop(); });
}

void Monitor::sample_now() {
  // Probes run without the lock: they read other objects' own locks.
  Sample s;
  s.t_s = static_cast<double>(now_ns() - start_ns_) * 1e-9;
  s.values.reserve(probes_.size());
  for (auto& p : probes_) s.values.push_back(p());
  std::lock_guard lock(mutex_);
  if (samples_.size() >= max_samples_) {
    std::vector<Sample> kept;
    kept.reserve(max_samples_ / 2 + 1);
    for (std::size_t i = 0; i < samples_.size(); i += 2) kept.push_back(std::move(samples_[i]));
    samples_ = std::move(kept);
    interval_s_ *= 2;
  }
  samples_.push_back(std::move(s));
}

void Monitor::loop() {
  for (;;) {
    sample_now();
    std::unique_lock lock(mutex_);
    if (stopping_) return;
    wake_.wait_for(lock, std::chrono::duration<double>(interval_s_), [&] { return stopping_; });
    if (stopping_) return;
  }
}

void Monitor::stop() {
  {
    std::lock_guard lock(mutex_);
    if (!running_) return;
    stopping_ = true;
    running_ = false;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  sample_now();  // the final state, so every plot ends at the end of the run
}

std::vector<std::string> Monitor::names() const {
  std::lock_guard lock(mutex_);
  return names_;
}

std::vector<Sample> Monitor::samples() const {
  std::lock_guard lock(mutex_);
  return samples_;
}

double Monitor::interval_s() const {
  std::lock_guard lock(mutex_);
  return interval_s_;
}

}  // namespace gpufleet::pipeline
