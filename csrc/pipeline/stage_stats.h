#pragma once
/// Counters of one pipeline stage (its workers' clocks, items, batches, errors) and the monitor that
/// samples queue depths and stage progress over time.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pipeline/clock.h"

namespace gpufleet::pipeline {

/// One stage's counters. Workers update them; the monitor and the report read them at any time.
class StageStats {
 public:
  StageStats(std::string name, int workers, std::size_t max_spans_per_worker = 20000);

  const std::string& name() const { return name_; }
  int workers() const { return static_cast<int>(clocks_.size()); }
  /// The clock of worker `i` (0 <= i < workers()); throws std::out_of_range otherwise.
  WorkerClock& clock(int i);
  const WorkerClock& clock(int i) const;

  void add_items_in(std::uint64_t n) { items_in_.fetch_add(n, std::memory_order_relaxed); }
  void add_items_out(std::uint64_t n) { items_out_.fetch_add(n, std::memory_order_relaxed); }
  /// One batch of `size` items processed.
  void add_batch(std::uint64_t size) {
    batches_.fetch_add(1, std::memory_order_relaxed);
    batch_items_.fetch_add(size, std::memory_order_relaxed);
  }
  void add_errors(std::uint64_t n) { errors_.fetch_add(n, std::memory_order_relaxed); }

  std::uint64_t items_in() const { return items_in_.load(std::memory_order_relaxed); }
  std::uint64_t items_out() const { return items_out_.load(std::memory_order_relaxed); }
  std::uint64_t batches() const { return batches_.load(std::memory_order_relaxed); }
  std::uint64_t batch_items() const { return batch_items_.load(std::memory_order_relaxed); }
  std::uint64_t errors() const { return errors_.load(std::memory_order_relaxed); }
  /// batch_items / batches, 0 without batches.
  double mean_batch_size() const;

  /// Sums over workers (open segments included).
  WorkerTotals totals() const;
  /// Busy time over the workers' summed wall time, in [0, 1].
  double utilization() const;

 private:
  std::string name_;
  std::vector<std::unique_ptr<WorkerClock>> clocks_;
  std::atomic<std::uint64_t> items_in_{0}, items_out_{0}, batches_{0}, batch_items_{0}, errors_{0};
};

/// The stage that limits throughput: the one whose workers spent the largest share of their wall
/// time busy (stages that wait on it are starved downstream and blocked upstream). Ties go to the
/// earlier stage. Returns -1 for an empty list or when no stage has run.
int limiting_stage(const std::vector<const StageStats*>& stages);

/// One sample of the monitor: time since the monitor started, one value per registered probe.
struct Sample {
  double t_s = 0;
  std::vector<double> values;
};

/// Samples registered probes (queue depths, item counters, busy times) every `interval_s` on its
/// own thread. Memory stays bounded: when `max_samples` is reached every other sample is dropped
/// and the interval doubles.
class Monitor {
 public:
  explicit Monitor(double interval_s = 0.05, std::size_t max_samples = 4096);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  /// Adds a probe; only before start(). Returns its column index.
  int add_probe(std::string name, std::function<double()> probe);
  void start();
  /// Takes a last sample and joins the thread (idempotent).
  void stop();

  std::vector<std::string> names() const;
  std::vector<Sample> samples() const;
  double interval_s() const;
  std::int64_t start_ns() const { return start_ns_; }

 private:
  void sample_now();
  void loop();

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  double interval_s_;
  std::size_t max_samples_;
  std::vector<std::string> names_;
  std::vector<std::function<double()>> probes_;
  std::vector<Sample> samples_;
  std::thread thread_;
  bool running_ = false, stopping_ = false;
  std::int64_t start_ns_ = 0;
};

}  // namespace gpufleet::pipeline
