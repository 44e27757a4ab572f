#include "pipeline/clock.h"

#include <chrono>

namespace gpufleet::pipeline {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* worker_state_name(WorkerState s) {
  switch (s) {
    case WorkerState::Idle: return "idle";
    case WorkerState::Busy: return "busy";
    case WorkerState::Starved: return "starved";
    case WorkerState::Blocked: return "blocked";
    case WorkerState::Done: return "done";
  }
  return "?";
}

void WorkerClock::start() {
  std::lock_guard lock(mutex_);
  if (state_ != WorkerState::Idle) return;
  start_ns_ = last_ns_ = now_ns();
  state_ = WorkerState::Busy;
}

void WorkerClock::close_segment_locked(std::int64_t t) {
  const std::int64_t d = t - last_ns_;
  acc_[static_cast<int>(state_)] += d;
  if (spans_.size() < max_spans_) {
    // Merge with the previous span when the state did not change (keeps traces short).
    if (!spans_.empty() && spans_.back().state == state_ &&
        spans_.back().start_ns + spans_.back().duration_ns == last_ns_) {
      spans_.back().duration_ns += d;
    } else {
      spans_.push_back({state_, last_ns_, d});
    }
  } else {
    ++dropped_;
  }
  last_ns_ = t;
}

void WorkerClock::switch_to(WorkerState next) {
  std::lock_guard lock(mutex_);
  if (state_ == WorkerState::Idle || state_ == WorkerState::Done || next == state_) return;
  if (next == WorkerState::Idle || next == WorkerState::Done) return;  // only finish() ends a clock
  close_segment_locked(now_ns());
  state_ = next;
}

void WorkerClock::finish() {
  std::lock_guard lock(mutex_);
  if (state_ == WorkerState::Idle || state_ == WorkerState::Done) return;
  const std::int64_t t = now_ns();
  close_segment_locked(t);
  end_ns_ = t;
  state_ = WorkerState::Done;
}

WorkerTotals WorkerClock::totals() const {
  std::lock_guard lock(mutex_);
  WorkerTotals out;
  out.busy_ns = acc_[static_cast<int>(WorkerState::Busy)];
  out.starved_ns = acc_[static_cast<int>(WorkerState::Starved)];
  out.blocked_ns = acc_[static_cast<int>(WorkerState::Blocked)];
  out.start_ns = start_ns_;
  out.state = state_;
  if (state_ == WorkerState::Idle) {
    out.end_ns = out.start_ns;
  } else if (state_ == WorkerState::Done) {
    out.end_ns = end_ns_;
  } else {
    out.end_ns = now_ns();
    const std::int64_t open = out.end_ns - last_ns_;
    if (state_ == WorkerState::Busy) out.busy_ns += open;
    if (state_ == WorkerState::Starved) out.starved_ns += open;
    if (state_ == WorkerState::Blocked) out.blocked_ns += open;
  }
  return out;
}

WorkerState WorkerClock::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

std::vector<Span> WorkerClock::spans() const {
  std::lock_guard lock(mutex_);
  return spans_;
}

std::size_t WorkerClock::dropped_spans() const {
  std::lock_guard lock(mutex_);
  return dropped_;
}

}  // namespace gpufleet::pipeline
