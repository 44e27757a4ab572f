// The per-run supervisor (reaper) process.
#include "dispatch/supervisor.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "dispatch/process.h"

namespace gpufleet::dispatch {

// Note [No process outlives the dispatcher]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Tasks are children of the dispatcher, each in its own process group (Note [Why tasks own a
// process group] in process.cpp). If the dispatcher dies normally it stops them itself. If it is
// killed with SIGKILL, nothing in it runs, so a separate process must do the cleanup:
//
// - At the start of a run the dispatcher forks a small supervisor. The supervisor puts itself in its
//   own process group (the terminal's Ctrl-C does not reach it), ignores SIGINT/SIGHUP/SIGTERM/
//   SIGPIPE, closes every inherited descriptor but its end of a socket pair whose other end only the
//   dispatcher holds (SOCK_CLOEXEC, so no task inherits it).
// - It renames itself: its command line (argv, what ps, pgrep -f and pkill -f read) becomes
//   "gf-supervisor run <run id>" and its name (comm, what plain pkill reads) "gf-supervisor". A forked
//   supervisor used to carry the dispatcher's command line, so `pkill -9 -f '<that command line>'`
//   killed both at once and orphaned every task. The new title fits in the old argv area, so it is
//   never longer than the dispatcher's command line and cannot contain it.
// - The dispatcher sends an 8-byte record "add pgid" right after starting a task (and "remove"
//   after reaping it). When the dispatcher dies for any reason the kernel closes its end and the
//   supervisor's read() returns 0 (EOF). It then runs the kill sequence: SIGTERM to every recorded
//   process group, a grace period, SIGKILL.
// - A grandchild that left its group (setsid, a daemon) or a task killed before its "add" record
//   was written is still found: every task's environment carries the run's marker
//   GPUFLEET_RUN_ID=<random token>, inherited by everything it starts, and the supervisor scans
//   /proc/*/environ for it (kill_marked_processes), at SIGTERM time and again at SIGKILL time. Only a
//   process that exec()s with a scrubbed environment *and* leaves the group escapes; we say so in
//   the docs rather than pretend otherwise.
// - On a normal end the dispatcher sends "quit": the supervisor kills what still carries the marker
//   (daemonised leftovers of finished tasks) and exits; the dispatcher reaps it.
// - The dispatcher watches its supervisor (a pidfd in the run loop's poll set; failed sends where
//   there is no pidfd). When the supervisor dies (someone SIGKILLs it), the dispatcher forks a new
//   one at once, replays the "add" record of every running task to it and says so in a message; the
//   run goes on with nothing lost. If no new supervisor can be forked the run fails: the kill sequence
//   stops every task and the error names the cause (tasks never run unguarded). Killing the
//   supervisor and the dispatcher in the same instant, before the replacement exists, still orphans
//   the tasks: that needs two deliberate SIGKILLs, and the renaming above keeps one pkill pattern
//   from doing it.
// The child side of the fork only uses async-signal-safe calls (read, kill, open, getdents64,
// nanosleep, prctl, memcpy, _exit) on memory prepared before the fork, because the dispatcher is
// usually a multi-threaded Python process. PR_SET_PDEATHSIG is not used: it fires when the *thread*
// that forked exits, not the process, which would kill the supervisor too early under a thread pool.
// The socket is SOCK_SEQPACKET (one record per read) and sends use MSG_NOSIGNAL: a write to a dead
// supervisor fails with EPIPE instead of killing a host process that does not ignore SIGPIPE.

namespace {

constexpr std::size_t kMaxGroups = 1 << 16;

struct Record {
  char op;  // 'A' add, 'R' remove, 'Q' quit
  char pad[3];
  std::int32_t pgid;
};
static_assert(sizeof(Record) == 8);

void sleep_ms(long ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

// Whether a marked process is still running. Group leaders are not asked with kill(-pgid, 0): a
// zombie leader (its parent, alive but blocked in close(), has not reaped it yet) would answer for
// the whole grace period; zombies have an empty /proc/<pid>/environ, so the marker scan skips them.
bool any_alive(const char* marker) { return kill_marked_processes(marker, 0) > 0; }

// Writes `title` over this process's argv area, the memory /proc/self/cmdline is read from, and
// names the process "gf-supervisor" (comm). The area's bounds are fields 48 and 49 of
// /proc/self/stat. Async-signal-safe (stack buffer, open/read, memset/memcpy). The last byte of the
// area stays NUL, so the kernel reports exactly the area (no setproctitle-style extension).
void set_title(const char* title) {
  prctl(PR_SET_NAME, "gf-supervisor", 0, 0, 0);
  char buf[4096];
  int fd = ::open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  std::size_t n = 0;
  for (;;) {
    ssize_t r = ::read(fd, buf + n, sizeof buf - 1 - n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    n += static_cast<std::size_t>(r);
    if (n == sizeof buf - 1) break;
  }
  ::close(fd);
  buf[n] = 0;
  const char* p = nullptr;
  for (std::size_t i = 0; i < n; ++i)
    if (buf[i] == ')') p = buf + i;  // the last ')': comm may hold spaces and parentheses
  if (p == nullptr) return;
  unsigned long field[50] = {};
  int k = 2;  // p is the end of field 2
  for (++p; *p && k < 49;) {
    while (*p == ' ') ++p;
    ++k;
    unsigned long v = 0;
    while (*p >= '0' && *p <= '9') v = v * 10 + static_cast<unsigned long>(*p++ - '0');
    while (*p && *p != ' ') ++p;  // a non-numeric field (the state)
    field[k] = v;
  }
  if (k < 49) return;
  const unsigned long arg_start = field[48], arg_end = field[49];
  if (arg_start == 0 || arg_end <= arg_start + 1) return;
  char* area = reinterpret_cast<char*>(arg_start);
  const std::size_t len = arg_end - arg_start;
  std::memset(area, 0, len);
  std::size_t t = std::strlen(title);
  if (t > len - 1) t = len - 1;
  std::memcpy(area, title, t);
}

[[noreturn]] void supervisor_main(int rfd, const char* marker, const char* title, long grace_ms,
                                  std::int32_t* groups) {
  setpgid(0, 0);
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigaction(SIGINT, &ign, nullptr);
  sigaction(SIGHUP, &ign, nullptr);
  sigaction(SIGTERM, &ign, nullptr);  // `pkill <pattern>` or a container stop: clean up on EOF, not die
  sigaction(SIGPIPE, &ign, nullptr);
  sigaction(SIGQUIT, &ign, nullptr);
  sigaction(SIGTSTP, &ign, nullptr);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  set_title(title);
  // Close everything inherited but the socket (another program's pipe held open here would never
  // see its EOF).
  for (int fd = 0; fd < 3; ++fd) {
    int devnull = ::open("/dev/null", O_RDWR);
    if (devnull >= 0 && devnull != fd) {
      dup2(devnull, fd);
      ::close(devnull);
    }
  }
#ifdef SYS_close_range
  if (rfd > 3) syscall(SYS_close_range, 3u, static_cast<unsigned>(rfd - 1), 0u);
  syscall(SYS_close_range, static_cast<unsigned>(rfd + 1), ~0u, 0u);
#else
  for (int fd = 3; fd < 4096; ++fd)
    if (fd != rfd) ::close(fd);
#endif
  std::size_t n = 0;
  bool quit = false;
  for (;;) {
    Record r;
    ssize_t got = ::read(rfd, &r, sizeof r);
    if (got < 0 && errno == EINTR) continue;
    if (got != static_cast<ssize_t>(sizeof r)) break;  // EOF: the dispatcher is gone
    if (r.op == 'A' && n < kMaxGroups) {
      groups[n++] = r.pgid;
    } else if (r.op == 'R') {
      for (std::size_t i = 0; i < n; ++i)
        if (groups[i] == r.pgid) {
          groups[i] = groups[--n];
          break;
        }
    } else if (r.op == 'Q') {
      quit = true;
      break;
    }
  }
  if (quit && n == 0) {
    kill_marked_processes(marker, SIGKILL);
    _exit(0);
  }
  for (std::size_t i = 0; i < n; ++i) ::kill(-groups[i], SIGTERM);
  kill_marked_processes(marker, SIGTERM);
  for (long waited = 0; waited < grace_ms && any_alive(marker); waited += 20) sleep_ms(20);
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < n; ++i) ::kill(-groups[i], SIGKILL);
    if (kill_marked_processes(marker, SIGKILL) == 0 && round > 0) break;
    sleep_ms(20);
  }
  _exit(0);
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status))
    return fmt::format("killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  if (WIFEXITED(status)) return fmt::format("exit status {}", WEXITSTATUS(status));
  return "ended";
}

}  // namespace

std::string random_token() {
  std::random_device rd;
  std::uint64_t a = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  std::uint64_t b = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^ static_cast<std::uint64_t>(::getpid());
  return fmt::format("{:016x}{:08x}", a, static_cast<std::uint32_t>(b));
}

std::string supervisor_title(const std::string& marker) {
  auto eq = marker.find('=');
  std::string token = eq == std::string::npos ? marker : marker.substr(eq + 1);
  return "gf-supervisor run " + token.substr(0, 12);
}

Supervisor::Supervisor(std::string marker, double grace_s)
    : marker_(std::move(marker)), title_(supervisor_title(marker_)), grace_ms_(static_cast<long>(grace_s * 1000)) {
  spawn();
}

void Supervisor::spawn() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0)
    throw std::runtime_error(fmt::format("cannot create the supervisor's socket: {}", std::strerror(errno)));
  // Everything the child touches is allocated before the fork.
  child_groups_.assign(kMaxGroups, 0);
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::runtime_error(fmt::format("cannot fork the supervisor: {}", std::strerror(e)));
  }
  if (pid == 0) supervisor_main(fds[0], marker_.c_str(), title_.c_str(), grace_ms_, child_groups_.data());
  ::close(fds[0]);
  pid_ = pid;
  pidfd_ = open_pidfd(pid);
  wfd_ = fds[1];
  send_failed_ = false;
}

bool Supervisor::send_locked(char op, pid_t pgid) {
  if (wfd_ < 0) return false;
  Record r{};
  r.op = op;
  r.pgid = pgid;
  ssize_t w;
  do w = ::send(wfd_, &r, sizeof r, MSG_NOSIGNAL);
  while (w < 0 && errno == EINTR);
  if (w != static_cast<ssize_t>(sizeof r)) send_failed_ = true;
  return !send_failed_;
}

void Supervisor::track(pid_t pgid) {
  std::lock_guard<std::mutex> lk(mu_);
  tracked_.insert(pgid);
  send_locked('A', pgid);
}

void Supervisor::untrack(pid_t pgid) {
  std::lock_guard<std::mutex> lk(mu_);
  tracked_.erase(pgid);
  send_locked('R', pgid);
}

bool Supervisor::lost() {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_ || pid_ <= 0) return false;
  if (send_failed_) return true;
  siginfo_t si{};
  int r;
  do r = ::waitid(P_PID, static_cast<id_t>(pid_), &si, WEXITED | WNOHANG | WNOWAIT);
  while (r < 0 && errno == EINTR);
  return r == 0 && si.si_pid == pid_;
}

std::string Supervisor::restart() {
  std::lock_guard<std::mutex> lk(mu_);
  const pid_t old = pid_;
  ::kill(old, SIGKILL);  // dead already (the callers know it is lost); never let it see EOF and clean up
  if (wfd_ >= 0) ::close(wfd_);
  wfd_ = -1;
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
  int status = 0;
  pid_t r;
  do r = ::waitpid(old, &status, 0);
  while (r < 0 && errno == EINTR);
  std::string how = r == old ? describe_status(status) : "gone";
  spawn();
  for (pid_t g : tracked_) send_locked('A', g);
  return fmt::format("the supervisor (pid {}) died ({}); pid {} replaces it and covers the {} running task{}", old,
                     how, pid_, tracked_.size(), tracked_.size() == 1 ? "" : "s");
}

void Supervisor::close() {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_ || pid_ <= 0) return;
  closed_ = true;
  send_locked('Q', 0);
  if (wfd_ >= 0) ::close(wfd_);
  wfd_ = -1;
  int status;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
  pid_ = -1;
}

Supervisor::~Supervisor() {
  try {
    close();
  } catch (...) {
  }
}

}  // namespace gpufleet::dispatch
