#pragma once
/// Per-worker time accounting for pipeline stages.
///
/// Note [Stats add up]: a worker's wall time is cut into consecutive segments, each attributed to
/// exactly one state: busy (running user code or the stage's own logic), starved (waiting for an
/// input), blocked (waiting for room downstream). A WorkerClock records the state it is in and the
/// time it entered it; `switch_to` closes the current segment. So busy + starved + blocked equals the
/// worker's wall time exactly (up to the clock's resolution), not approximately.
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace gpufleet::pipeline {

/// Nanoseconds on the monotonic clock shared by every pipeline object (steady_clock).
std::int64_t now_ns();

enum class WorkerState : int { Idle = 0, Busy = 1, Starved = 2, Blocked = 3, Done = 4 };

/// "busy", "starved", "blocked", "idle" or "done".
const char* worker_state_name(WorkerState s);

/// One closed segment of a worker's timeline, kept for traces.
struct Span {
  WorkerState state;
  std::int64_t start_ns;
  std::int64_t duration_ns;
};

/// Totals of one worker, possibly while it is still running (the open segment is included).
struct WorkerTotals {
  std::int64_t busy_ns = 0, starved_ns = 0, blocked_ns = 0;
  std::int64_t start_ns = 0, end_ns = 0;  ///< end_ns: finish time, or now for a running worker
  WorkerState state = WorkerState::Idle;
  std::int64_t wall_ns() const { return end_ns - start_ns; }
};

/// The time accounting of one worker thread (see Note [Stats add up]). Thread-safe: the worker
/// switches states while a monitor reads totals.
class WorkerClock {
 public:
  /// `max_spans` bounds the trace kept in memory (0: none); later spans are counted as dropped.
  explicit WorkerClock(std::size_t max_spans = 20000) : max_spans_(max_spans) {}

  /// Starts the clock in the Busy state (idempotent: a second start is ignored).
  void start();
  /// Closes the current segment and enters `next`. Ignored before start() and after finish().
  void switch_to(WorkerState next);
  /// Closes the current segment for good.
  void finish();

  WorkerTotals totals() const;
  WorkerState state() const;
  std::vector<Span> spans() const;
  std::size_t dropped_spans() const;

 private:
  void close_segment_locked(std::int64_t t);

  mutable std::mutex mutex_;
  std::size_t max_spans_;
  WorkerState state_ = WorkerState::Idle;
  std::int64_t start_ns_ = 0, last_ns_ = 0, end_ns_ = 0;
  std::int64_t acc_[5] = {0, 0, 0, 0, 0};
  std::vector<Span> spans_;
  std::size_t dropped_ = 0;
};

/// RAII: enters a waiting state, returns to Busy when the wait ends (on every path).
class WaitScope {
 public:
  WaitScope(WorkerClock* clock, WorkerState waiting) : clock_(clock) {
    if (clock_) clock_->switch_to(waiting);
  }
  ~WaitScope() {
    if (clock_) clock_->switch_to(WorkerState::Busy);
  }
  WaitScope(const WaitScope&) = delete;
  WaitScope& operator=(const WaitScope&) = delete;

 private:
  WorkerClock* clock_;
};

}  // namespace gpufleet::pipeline
