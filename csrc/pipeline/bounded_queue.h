#pragma once
/// A bounded multi-producer multi-consumer queue between pipeline stages.
///
/// Note [Close and cancel]: a queue ends in one of two ways.
/// - close(): no more puts; getters drain what is left, then see Closed. A queue with registered
///   producers closes itself when the last one calls producer_done(). This is the normal end of a run.
/// - cancel(): every blocked or later put/get returns Cancelled at once; items still inside stay
///   there until drain() takes them (the owner may need to release them, e.g. Python references).
///   This is the Ctrl-C / failing-stage path: no thread stays blocked, so every worker can be joined.
/// Waiting time is charged to the caller's WorkerClock as starved (get) or blocked (put): see
/// Note [Stats add up] in clock.h.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "common/error.h"
#include "pipeline/clock.h"

namespace gpufleet::pipeline {

enum class QueueStatus : int { Ok = 0, Closed = 1, Cancelled = 2, Timeout = 3, WouldBlock = 4 };

/// "ok", "closed", "cancelled", "timeout", "would_block".
inline const char* queue_status_name(QueueStatus s) {
  switch (s) {
    case QueueStatus::Ok: return "ok";
    case QueueStatus::Closed: return "closed";
    case QueueStatus::Cancelled: return "cancelled";
    case QueueStatus::Timeout: return "timeout";
    case QueueStatus::WouldBlock: return "would_block";
  }
  return "?";
}

/// Bounded FIFO of T (see Note [Close and cancel]).
template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(std::size_t capacity) : capacity_(capacity) {
    GF_CHECK_ARG(capacity >= 1, "queue capacity must be at least 1, got {}", capacity);
  }

  std::size_t capacity() const { return capacity_; }

  /// Declares how many producers will call producer_done(); the queue closes after the last one.
  void set_producers(int n) {
    GF_CHECK_ARG(n >= 1, "a queue needs at least 1 producer, got {}", n);
    std::lock_guard lock(mutex_);
    producers_ = n;
  }

  /// One producer has finished; closes the queue when it was the last. Returns true when it closed.
  bool producer_done() {
    std::lock_guard lock(mutex_);
    GF_ASSERT(producers_ > 0, "producer_done() called more often than set_producers({})", producers_);
    if (--producers_ == 0) {
      closed_ = true;
      not_empty_.notify_all();
      not_full_.notify_all();
      return true;
    }
    return false;
  }

  /// Non-blocking put: Ok (the item was moved in), WouldBlock (full), Closed or Cancelled.
  QueueStatus try_put(T& item) {
    std::lock_guard lock(mutex_);
    return put_locked(item);
  }

  /// Blocking put. `timeout_s < 0` waits forever. On anything but Ok the item is left with the caller.
  QueueStatus put(T& item, WorkerClock* clock = nullptr, double timeout_s = -1) {
    std::unique_lock lock(mutex_);
    QueueStatus s = put_locked(item);
    if (s != QueueStatus::WouldBlock) return s;
    WaitScope wait(clock, WorkerState::Blocked);
    ++waiting_putters_;
    const auto ready = [&] { return cancelled_ || closed_ || items_.size() < capacity_; };
    bool ok = true;
    if (timeout_s < 0) {
      not_full_.wait(lock, ready);
    } else {
      ok = not_full_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
    }
    --waiting_putters_;
    if (!ok) return QueueStatus::Timeout;
    return put_locked(item);
  }

  /// Non-blocking get: Ok (moved into `out`), WouldBlock (empty), Closed (empty and closed), Cancelled.
  QueueStatus try_get(T& out) {
    std::lock_guard lock(mutex_);
    return get_locked(out);
  }

  /// Blocking get. `timeout_s < 0` waits forever.
  QueueStatus get(T& out, WorkerClock* clock = nullptr, double timeout_s = -1) {
    std::unique_lock lock(mutex_);
    QueueStatus s = get_locked(out);
    if (s != QueueStatus::WouldBlock) return s;
    WaitScope wait(clock, WorkerState::Starved);
    ++waiting_getters_;
    const auto ready = [&] { return cancelled_ || closed_ || !items_.empty(); };
    bool ok = true;
    if (timeout_s < 0) {
      not_empty_.wait(lock, ready);
    } else {
      ok = not_empty_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
    }
    --waiting_getters_;
    if (!ok) return QueueStatus::Timeout;
    return get_locked(out);
  }

  /// No more puts (Note [Close and cancel]).
  void close() {
    std::lock_guard lock(mutex_);
    closed_ = true;
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  /// Wakes every waiter; all later operations return Cancelled.
  void cancel() {
    std::lock_guard lock(mutex_);
    cancelled_ = true;
    not_empty_.notify_all();
    not_full_.notify_all();
  }

  /// Takes every item still inside (for release after cancel()).
  std::vector<T> drain() {
    std::lock_guard lock(mutex_);
    std::vector<T> out;
    out.reserve(items_.size());
    for (auto& x : items_) out.push_back(std::move(x));
    items_.clear();
    not_full_.notify_all();
    return out;
  }

  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return items_.size();
  }
  bool closed() const {
    std::lock_guard lock(mutex_);
    return closed_;
  }
  bool cancelled() const {
    std::lock_guard lock(mutex_);
    return cancelled_;
  }
  /// The largest size the queue has reached.
  std::size_t high_water() const {
    std::lock_guard lock(mutex_);
    return high_water_;
  }
  /// Items ever put / taken.
  std::uint64_t total_put() const {
    std::lock_guard lock(mutex_);
    return total_put_;
  }
  std::uint64_t total_got() const {
    std::lock_guard lock(mutex_);
    return total_got_;
  }

 private:
  QueueStatus put_locked(T& item) {
    if (cancelled_) return QueueStatus::Cancelled;
    if (closed_) return QueueStatus::Closed;
    if (items_.size() >= capacity_) return QueueStatus::WouldBlock;
    items_.push_back(std::move(item));
    ++total_put_;
    if (items_.size() > high_water_) high_water_ = items_.size();
    if (waiting_getters_ > 0) not_empty_.notify_one();
    return QueueStatus::Ok;
  }

  QueueStatus get_locked(T& out) {
    if (cancelled_) return QueueStatus::Cancelled;
    if (items_.empty()) return closed_ ? QueueStatus::Closed : QueueStatus::WouldBlock;
    out = std::move(items_.front());
    items_.pop_front();
    ++total_got_;
    if (waiting_putters_ > 0) not_full_.notify_one();
    return QueueStatus::Ok;
  }

  const std::size_t capacity_;
  mutable std::mutex mutex_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> items_;
  bool closed_ = false, cancelled_ = false;
  int producers_ = 0;
  int waiting_getters_ = 0, waiting_putters_ = 0;
  std::size_t high_water_ = 0;
  std::uint64_t total_put_ = 0, total_got_ = 0;
};

}  // namespace gpufleet::pipeline
