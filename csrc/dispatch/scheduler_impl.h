#pragma once
// The dispatcher's state, shared by the files of its run loop (not installed, not used elsewhere):
//   scheduler.cpp   the loop itself: poll(), interrupts, the end of a run, events
//   admission.cpp   input (pull, accept, resume/skip checks), memory-aware admission, placement
//   launching.cpp   a task's environment and launch, the launcher's results, its output pipe
//   completion.cpp  exits: status, atomic outputs, retries, quarantine, the kill sequence
// Everything here runs on the run loop's thread, except what Note [Launcher threads] (process.h) says.
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dispatch/journal.h"
#include "dispatch/process.h"
#include "dispatch/scheduler.h"
#include "dispatch/supervisor.h"

namespace gpufleet::dispatch {

inline double mono() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline double epoch() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
bool file_exists(const std::string& p);

/// Variables the dispatcher sets for every task (a task's own env may not override them).
extern const std::vector<std::string> kReservedVars;

struct Pending {
  TaskSpec spec;
  int attempt = 1;
  double not_before = 0;
  int avoid = -1;
};

struct Running {
  TaskSpec spec;
  int attempt = 1;
  std::vector<int> devices;  // pool positions
  std::vector<int> slots;    // slot per device (or the CPU slot)
  Child child;
  // Launching: submitted to the launcher, no pid yet (its Started event waits in `started`).
  bool launching = false, launch_done = false;
  std::uint64_t launch_id = 0;
  std::string launch_error;
  TaskEvent started;
  double start_mono = 0, start_epoch = 0;
  double deadline = 0, kill_at = 0;
  bool timed_out = false, cancelled = false;
  std::string log_path, partial;
};

struct DevState {
  std::vector<bool> busy;
  int running = 0;
  int consecutive_failures = 0;
  bool quarantined = false;
  std::uint64_t reserved_all = 0, reserved_since = 0;
  MemoryReading mem;
};

/// A canonical output path as two independent 64-bit hashes (Note [Output collisions]).
struct PathKey {
  std::uint64_t a = 0, b = 0;
  friend bool operator==(const PathKey&, const PathKey&) = default;
};
struct PathKeyHash {
  std::size_t operator()(const PathKey& k) const noexcept { return static_cast<std::size_t>(k.a ^ (k.b << 1)); }
};

struct Dispatcher::Impl {
  DispatchOptions opt;
  DispatchHooks hooks;
  std::string token, run_id, marker;
  std::string run_log_dir;  // <log_dir>/<run_id> with OutputMode::File
  std::unordered_map<PathKey, std::int64_t, PathKeyHash> output_claims;  // canonical output -> task seq
  std::set<std::pair<dev_t, ino_t>> produced;                            // outputs this run renamed into place
  std::vector<std::string> base_env;
  std::unique_ptr<Journal> journal;
  std::unique_ptr<Supervisor> supervisor;
  std::list<Pending> queue;
  std::list<Running> running;
  std::unique_ptr<Launcher> launcher;
  std::deque<std::list<Running>::iterator> launching;  // submission order
  std::uint64_t next_launch_id = 1;
  std::vector<DevState> devs;
  std::vector<bool> cpu_busy;
  std::vector<TaskEvent> events;
  RunTotals totals;
  bool source_done = false;
  double last_mem_read = -1e30, last_flush = 0, last_check = 0;
  bool memory_unknown_warned = false;
  std::atomic<int> interrupts{0};
  std::atomic<bool> drain_req{false}, cancel_req{false};
  bool drain_seen = false, cancel_seen = false;
  int wake[2] = {-1, -1};
  // Note [Open input]
  std::atomic<bool> input_ready{false}, input_closed{false};
  bool input_idle = false;            // the last pull was empty and nothing said there is more since
  bool quarantine_wait_warned = false;
  std::mutex cancel_mu;
  std::vector<std::int64_t> cancel_seqs;  // cancel_task() requests, taken by handle_requests()

  Impl(DispatchOptions o, DispatchHooks h);
  ~Impl();

  bool stopping() const { return drain_seen || cancel_seen; }
  std::size_t total_slots() const { return devs.size() * opt.slots_per_device + cpu_busy.size(); }

  // scheduler.cpp
  void poke();
  void message(const std::string& text);
  std::string device_names(const std::vector<int>& ds) const;
  void flush_events(bool force);
  void finish_unstarted(const TaskSpec& t, TaskStatus status, const std::string& why);
  void handle_requests(double now);
  void cancel_tasks(double now);
  bool wants_input() const {
    return !stopping() && !source_done && !input_idle && queue.size() <= opt.lookahead / 2;
  }
  RunTotals run();
  void abort_all();
  void loop();

  // admission.cpp
  void pull_more();
  void accept(TaskSpec t);
  std::int64_t claim_output(const std::string& final_path, std::int64_t seq);  // -1, or the other task's seq
  void release_outputs(const TaskSpec& t);  // keep_open: a finished task's claims go
  bool outputs_renamed_since(const TaskSpec& t, double start);
  std::vector<MemoryReading> read_memory();
  void refresh_memory(double now);
  bool memory_fits(int d, std::uint64_t need);
  bool can_ever_fit(std::uint64_t need);
  int free_slot(int d) const;
  bool any_free_slot() const;
  bool pick(const Pending& p, std::vector<int>& chosen);
  void schedule(double now);

  // launching.cpp
  void start(Pending& p, const std::vector<int>& ds, const std::vector<int>& slots);
  void collect_launches(bool wait, bool results = true);
  void complete_start(std::list<Running>::iterator it);
  void pump_output(Running& r, bool final);

  // completion.cpp
  void finish(std::list<Running>::iterator it, ExitStatus st, std::string why = {});
  void stop_task(Running& r, double now);
};

}  // namespace gpufleet::dispatch
