#pragma once
/// The dispatcher's run loop: slots on a device pool, a work-conserving shared queue with optional
/// affinity (idle devices steal), memory-aware admission, quarantine, timeouts and the kill
/// sequence, retries with backoff, atomic outputs, the journal, drain and cancel.
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "dispatch/process.h"
#include "dispatch/task.h"

namespace gpufleet::dispatch {

struct DispatchOptions {
  std::vector<PoolDevice> devices;   ///< the GPU pool (may be empty: CPU-only tasks)
  int slots_per_device = 1;
  int cpu_slots = 0;                 ///< slots for gpus=0 tasks; 0: devices × slots (at least 1)
  int quarantine_after = 3;          ///< consecutive failures that quarantine a device; 0: never
  double kill_grace_s = 5.0;         ///< SIGTERM → SIGKILL
  double retry_backoff_s = 0.5;      ///< first retry delay, doubled per attempt
  OutputMode output = OutputMode::Pipe;  ///< Pipe = lines passed through with a "[name] " prefix
  std::string log_dir;               ///< with OutputMode::File: <log_dir>/<run_id>/task-<seq+1>.attempt-<k>.log
  /// The run's id (log directory, journal, events); empty: a new random one. A cluster run's agents
  /// share their driver's (python/gpufleet/cluster/_agent.py), so its logs land in one directory.
  std::string run_id;
  std::string journal_path;          ///< empty: no journal
  bool resume = false;               ///< skip tasks the journal records as succeeded (outputs present)
  bool skip_existing = false;        ///< skip tasks whose declared outputs all exist
  std::size_t lookahead = 0;         ///< tasks pulled ahead of the slots; 0: 4 × slots + 16
  double memory_poll_s = 0.5;        ///< how often free memory is re-read while a task waits for it
  double event_interval_s = 0.1;     ///< how often events are handed to on_events
  int launch_threads = 0;            ///< threads that spawn children (Note [Launcher threads]); 0: min(slots, cores in [4, 16])
  std::string description;           ///< recorded in the journal's runs table
  /// Note [Open input] in scheduler.cpp: an empty pull means "nothing now", not the end of the input;
  /// the run goes on until close_input() (or a drain / cancel). For a long-lived queue.
  bool keep_open = false;
};

/// Free and total memory of one pool device (nullopt: unknown).
struct MemoryReading {
  std::optional<std::uint64_t> free, total;
};

struct DispatchHooks {
  /// Returns up to `max` more tasks; an empty vector means the input is exhausted.
  std::function<std::vector<TaskSpec>(std::size_t max)> pull;
  /// Receives events in batches (at most every event_interval_s, and at the end).
  std::function<void(std::vector<TaskEvent>&)> on_events;
  /// Called often (≤ 50 ms apart) and when `wake_fd` is readable; may call Dispatcher::interrupt().
  std::function<void()> check_interrupt;
  /// Free/total memory per pool device; default: gpufleet::discover() (NVML or simulated topology).
  std::function<std::vector<MemoryReading>()> memory;
  int wake_fd = -1;
};

/// Per-device and overall counts of a finished run.
struct RunTotals {
  std::int64_t succeeded = 0, failed = 0, skipped = 0, not_started = 0, attempts = 0;
  bool drained = false, cancelled = false;
  std::vector<int> quarantined;  ///< pool positions
  std::string run_id;
};

class Dispatcher {
 public:
  Dispatcher(DispatchOptions options, DispatchHooks hooks);
  ~Dispatcher();
  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;

  /// Runs every task to completion (or until drained / cancelled). Blocks; call without the GIL.
  RunTotals run();

  /// The Ctrl-C policy: the first call drains (start nothing new, let running tasks finish), the
  /// second cancels (kill sequence on every running task). Thread-safe.
  void interrupt();
  void drain();
  void cancel();

  /// Note [Open input]: with keep_open, says that pull may have more tasks now (the loop asks again),
  /// and ends the input (close_input: the run ends once its tasks are done). Thread-safe.
  void notify_input();
  void close_input();
  /// The kill sequence for one task (running, or being launched), or its removal from the queue when
  /// it has not started (a pending retry included): its Finished event has the status Cancelled. A
  /// task that is not in the run (finished, never pulled) is left alone. Thread-safe.
  void cancel_task(std::int64_t seq);
  /// Free slots now: GPU slots on healthy devices, devices with at least one free slot, CPU slots.
  /// For a host's pull (Note [Open input]): call it from a hook, on the run loop's thread.
  struct FreeSlots {
    int gpu_slots = 0, gpu_devices = 0, cpu_slots = 0;
  };
  FreeSlots free_slots() const;

  const std::string& run_id() const;
  /// The "GPUFLEET_RUN_ID=<token>" entry every task of the run carries (Note [No process outlives the
  /// dispatcher]): whoever outlives this dispatcher can find the run's processes with it.
  const std::string& marker() const;

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace gpufleet::dispatch
