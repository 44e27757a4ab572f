#pragma once
/// Launching a task as a real child process in its own process group, and stopping that group.
#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace gpufleet::dispatch {

/// How a child's stdout and stderr are wired.
enum class OutputMode {
  File,     ///< both appended to `log_path`
  Pipe,     ///< both to a pipe the dispatcher reads (to print lines with a task prefix)
  Inherit,  ///< the dispatcher's own stdout/stderr
  Null,     ///< /dev/null
};

struct LaunchSpec {
  std::vector<std::string> argv;
  std::vector<std::string> env;  ///< complete environment, "KEY=VALUE"
  std::string cwd;
  OutputMode output = OutputMode::Inherit;
  std::string log_path;
};

struct Child {
  pid_t pid = -1;       ///< also its process group id
  int pidfd = -1;       ///< pollable; -1 where the kernel has no pidfd_open
  int output_fd = -1;   ///< read end of the pipe (OutputMode::Pipe)
};

/// Starts the child with posix_spawn (vfork-like: cheap from a large Python process): own process
/// group, stdin from /dev/null, default signal dispositions and an empty signal mask, `cwd`.
/// Throws std::runtime_error naming the program and the errno text when it cannot be started.
Child launch(const LaunchSpec& spec);

/// Exit status of a reaped child.
struct ExitStatus {
  std::optional<int> exit_code;
  std::optional<int> signal;
};

/// Non-blocking waitpid for this pid; nullopt while it runs.
std::optional<ExitStatus> try_reap(pid_t pid);
/// Blocking waitpid.
ExitStatus reap(pid_t pid);

/// Sends `sig` to the whole process group `pgid` (ESRCH ignored). True if any process received it.
bool signal_group(pid_t pgid, int sig);

/// Closes the fds of a reaped child.
void close_child(Child& c);

/// Environment of this process as "KEY=VALUE" strings, without the variables named in `drop`.
std::vector<std::string> current_environment(const std::vector<std::string>& drop);

/// Kills every process (other than this one) whose initial environment holds the entry `marker`
/// ("NAME=VALUE"), scanning /proc. Async-signal-safe (no allocation): usable in the supervisor.
/// Returns how many processes were signalled.
int kill_marked_processes(const char* marker, int sig);

}  // namespace gpufleet::dispatch
