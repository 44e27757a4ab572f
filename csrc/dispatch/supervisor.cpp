// The per-run supervisor (reaper) process.
#include "dispatch/supervisor.h"

#include <fcntl.h>
#include <signal.h>
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
//   own process group (the terminal's Ctrl-C does not reach it), ignores SIGINT/SIGHUP/SIGPIPE,
//   closes every inherited descriptor but the read end of a pipe whose write end only the
//   dispatcher holds (O_CLOEXEC, so no task inherits it).
// - The dispatcher writes an 8-byte record "add pgid" right after starting a task (and "remove"
//   after reaping it). When the dispatcher dies for any reason the kernel closes the write end and
//   the supervisor's read() returns 0 (EOF). It then runs the kill sequence: SIGTERM to every
//   recorded process group, a grace period, SIGKILL.
// - A grandchild that left its group (setsid, a daemon) or a task killed before its "add" record
//   was written is still found: every task's environment carries the run's marker
//   GPUFLEET_RUN_ID=<random token>, inherited by everything it starts, and the supervisor scans
//   /proc/*/environ for it (kill_marked_processes), at SIGTERM time and again at SIGKILL time. Only a
//   process that exec()s with a scrubbed environment *and* leaves the group escapes; we say so in
//   the docs rather than pretend otherwise.
// - On a normal end the dispatcher sends "quit": the supervisor kills what still carries the marker
//   (daemonised leftovers of finished tasks) and exits; the dispatcher reaps it.
// The child side of the fork only uses async-signal-safe calls (read, kill, open, getdents64,
// nanosleep, _exit) on memory prepared before the fork, because the dispatcher is usually a
// multi-threaded Python process. PR_SET_PDEATHSIG is not used: it fires when the *thread* that
// forked exits, not the process, which would kill the supervisor too early under a thread pool.

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

[[noreturn]] void supervisor_main(int rfd, const char* marker, long grace_ms, std::int32_t* groups) {
  setpgid(0, 0);
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigaction(SIGINT, &ign, nullptr);
  sigaction(SIGHUP, &ign, nullptr);
  sigaction(SIGPIPE, &ign, nullptr);
  sigaction(SIGQUIT, &ign, nullptr);
  sigaction(SIGTSTP, &ign, nullptr);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  // Close everything inherited but the pipe (another program's pipe held open here would never
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

}  // namespace

std::string random_token() {
  std::random_device rd;
  std::uint64_t a = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  std::uint64_t b = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^ static_cast<std::uint64_t>(::getpid());
  return fmt::format("{:016x}{:08x}", a, static_cast<std::uint32_t>(b));
}

Supervisor::Supervisor(std::string marker, double grace_s) : marker_(std::move(marker)) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(fmt::format("pipe2: {}", std::strerror(errno)));
  // Everything the child touches is allocated before the fork.
  std::vector<std::int32_t> groups(kMaxGroups);
  const long grace_ms = static_cast<long>(grace_s * 1000);
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::runtime_error(fmt::format("cannot fork the supervisor: {}", std::strerror(e)));
  }
  if (pid == 0) supervisor_main(fds[0], marker_.c_str(), grace_ms, groups.data());
  ::close(fds[0]);
  pid_ = pid;
  wfd_ = fds[1];
}

void Supervisor::send(char op, pid_t pgid) {
  if (wfd_ < 0) return;
  Record r{};
  r.op = op;
  r.pgid = pgid;
  ssize_t w;
  do w = ::write(wfd_, &r, sizeof r);
  while (w < 0 && errno == EINTR);
}

void Supervisor::track(pid_t pgid) { send('A', pgid); }
void Supervisor::untrack(pid_t pgid) { send('R', pgid); }

void Supervisor::close() {
  if (wfd_ < 0) return;
  send('Q', 0);
  ::close(wfd_);
  wfd_ = -1;
  int status;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

Supervisor::~Supervisor() {
  try {
    close();
  } catch (...) {
  }
}

}  // namespace gpufleet::dispatch
