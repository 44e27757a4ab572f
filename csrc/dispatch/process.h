#pragma once
/// Launching a task as a real child process in its own process group, and stopping that group.
#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
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
  std::string program;  ///< the file to exec; empty: argv[0], searched in PATH when it has no '/'

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

/// A pollable descriptor for a child process (readable once it has exited), close-on-exec; -1 where
/// the kernel has no pidfd_open (before Linux 5.3).
int open_pidfd(pid_t pid);

/// Exit status of a reaped child.
struct ExitStatus {
  std::optional<int> exit_code;
  std::optional<int> signal;
};

/// Non-blocking waitpid for this pid; nullopt while it runs.
std::optional<ExitStatus> try_reap(pid_t pid);
/// For a task child (a process group leader): nullopt while it runs; once it has exited, SIGKILL to
/// what is left of its group *while its zombie still holds the group id* (so the id cannot have been
/// reused by another task started meanwhile), then reap it.
std::optional<ExitStatus> reap_group(pid_t pid);
/// Blocking waitpid.
ExitStatus reap(pid_t pid);

/// Sends `sig` to the whole process group `pgid` (ESRCH ignored). True if any process received it.
bool signal_group(pid_t pgid, int sig);

/// Closes the fds of a reaped child.
void close_child(Child& c);

/// Resolves a program name without '/' the way posix_spawnp does (PATH of this process, default
/// "/bin:/usr/bin"; relative PATH entries are relative to `cwd`, where the child starts), so that the
/// search costs a few stat() calls here instead of failed execve() calls in the child. Returns the
/// path to exec (relative to `cwd` where the entry was relative), or the name itself with `err` set
/// to the errno the search would end with (ENOENT, EACCES). Names with '/' come back unchanged.
std::string resolve_program(const std::string& name, const std::string& cwd, int& err);

/// Note [Launcher threads]: posix_spawn (vfork semantics) blocks the calling thread until the child
/// has exec()ed, and on a loaded machine that wait is mostly the child waiting for a CPU (about a
/// millisecond per `true` on 2 busy cores). One run loop spawning every child itself therefore
/// launches one task at a time. A Launcher runs those calls on a few threads: the run loop submits a
/// LaunchSpec and goes on; a thread spawns the child, reports the pid to `spawned` at once (the
/// supervisor's "add" record: the window in which a SIGKILLed dispatcher could leave the child
/// untracked stays as short as before, and the /proc marker scan covers it anyway) and queues the
/// result; `fd()` becomes readable and the loop collects results with take(). The threads block
/// every signal (signals keep going to the Python thread), touch neither Python nor the run loop's
/// state, and read no environment (the loop resolves PATH itself: resolve_program).
class Launcher {
 public:
  struct Done {
    std::uint64_t id = 0;
    Child child;         ///< pid -1 when it could not be started
    std::string error;   ///< why not
  };
  Launcher(int threads, std::function<void(pid_t)> spawned);
  ~Launcher();  ///< waits for the launches in flight, joins the threads
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  void submit(std::uint64_t id, LaunchSpec spec);
  /// Readable (eventfd) while results may be waiting.
  int fd() const { return efd_; }
  /// The results so far (any order); non-blocking.
  std::vector<Done> take();
  /// Blocks until every submitted launch has finished (their results stay for take()).
  void wait_idle();
  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void worker();
  std::mutex mu_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<std::pair<std::uint64_t, LaunchSpec>> jobs_;
  std::vector<Done> done_;
  int in_flight_ = 0;
  bool stop_ = false;
  int efd_ = -1;
  std::function<void(pid_t)> spawned_;
  std::vector<std::thread> threads_;
};

/// Environment of this process as "KEY=VALUE" strings, without the variables named in `drop`.
std::vector<std::string> current_environment(const std::vector<std::string>& drop);

/// Kills every process (other than this one) whose initial environment holds the entry `marker`
/// ("NAME=VALUE"), scanning /proc. Async-signal-safe (no allocation): usable in the supervisor.
/// Returns how many processes were signalled.
int kill_marked_processes(const char* marker, int sig);

}  // namespace gpufleet::dispatch
