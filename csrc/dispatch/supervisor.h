#pragma once
/// The reaper that outlives a dispatcher killed with SIGKILL. See Note [No process outlives the
/// dispatcher] in supervisor.cpp.
#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

namespace gpufleet::dispatch {

class Supervisor {
 public:
  /// Forks the supervisor. `marker` is the "NAME=VALUE" environment entry every task of the run
  /// carries; `grace_s` the time between SIGTERM and SIGKILL when it has to clean up.
  Supervisor(std::string marker, double grace_s);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  /// Records / forgets a process group the dispatcher started. Thread-safe.
  void track(pid_t pgid);
  void untrack(pid_t pgid);
  /// Normal end: the supervisor kills whatever still carries the marker (a task's daemonised
  /// grandchild), then exits; this call waits for it.
  void close();

  /// Readable once the supervisor process has ended (a pidfd; -1 where the kernel has none: poll
  /// lost() instead).
  int pidfd() const { return pidfd_; }
  /// Whether the supervisor ended without close() (killed): checks the process and failed sends.
  bool lost();
  /// Replaces a lost supervisor: reaps it, forks a new one and tells it every group still tracked.
  /// Returns how the old one ended ("killed by signal 9"). Throws std::runtime_error when no new
  /// one can be forked.
  std::string restart();

  const std::string& marker() const { return marker_; }
  pid_t pid() const { return pid_; }

 private:
  void spawn();                            // forks; mu_ held or not yet shared
  bool send_locked(char op, pid_t pgid);   // false when the supervisor is gone
  std::mutex mu_;
  std::string marker_;
  std::string title_;
  long grace_ms_ = 0;
  pid_t pid_ = -1;
  int pidfd_ = -1;
  int wfd_ = -1;
  bool send_failed_ = false;
  bool closed_ = false;
  std::unordered_set<pid_t> tracked_;      // replayed to a replacement
  std::vector<std::int32_t> child_groups_;  // the child's table, allocated before every fork
};

/// A fresh random marker value (hex) for a run.
std::string random_token();

/// The process title a supervisor shows in ps and /proc/<pid>/cmdline for the marker's run.
std::string supervisor_title(const std::string& marker);

}  // namespace gpufleet::dispatch
