#pragma once
/// The reaper that outlives a dispatcher killed with SIGKILL. See Note [No process outlives the
/// dispatcher] in supervisor.cpp.
#include <sys/types.h>

#include <string>

namespace gpufleet::dispatch {

class Supervisor {
 public:
  /// Forks the supervisor. `marker` is the "NAME=VALUE" environment entry every task of the run
  /// carries; `grace_s` the time between SIGTERM and SIGKILL when it has to clean up.
  Supervisor(std::string marker, double grace_s);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  /// Records / forgets a process group the dispatcher started.
  void track(pid_t pgid);
  void untrack(pid_t pgid);
  /// Normal end: the supervisor kills whatever still carries the marker (a task's daemonised
  /// grandchild), then exits; this call waits for it.
  void close();

  const std::string& marker() const { return marker_; }
  pid_t pid() const { return pid_; }

 private:
  void send(char op, pid_t pgid);
  std::string marker_;
  pid_t pid_ = -1;
  int wfd_ = -1;
};

/// A fresh random marker value (hex) for a run.
std::string random_token();

}  // namespace gpufleet::dispatch
