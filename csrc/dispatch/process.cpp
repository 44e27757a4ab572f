// Child processes: posix_spawn into a new process group, reaping, group signals, marker scans.
#include "dispatch/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

extern char** environ;

namespace gpufleet::dispatch {

namespace {

struct SpawnAttrs {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  SpawnAttrs() {
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&actions);
  }
  ~SpawnAttrs() {
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&actions);
  }
};

ExitStatus decode(int status) {
  ExitStatus s;
  if (WIFEXITED(status)) s.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) s.signal = WTERMSIG(status);
  return s;
}

}  // namespace

int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  long fd = syscall(SYS_pidfd_open, pid, 0);
  if (fd >= 0) {
    fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);
    return static_cast<int>(fd);
  }
#endif
  return -1;
}

Child launch(const LaunchSpec& spec) {
  if (spec.argv.empty()) throw std::invalid_argument("a task needs a non-empty command (argv)");
  SpawnAttrs sa;
  // Note [Why tasks own a process group]: a task's process group holds the command and every
  // process it starts (unless one calls setsid), so a timeout or a cancel stops all of them with one
  // kill(-pgid), and the terminal's Ctrl-C (sent to the dispatcher's foreground group) does not hit
  // the tasks: the dispatcher decides (drain first, kill sequence second).
  short flags = POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK;
  posix_spawnattr_setflags(&sa.attr, flags);
  posix_spawnattr_setpgroup(&sa.attr, 0);
  sigset_t all, none;
  sigfillset(&all);
  sigdelset(&all, SIGKILL);
  sigdelset(&all, SIGSTOP);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&sa.attr, &all);  // Python ignores SIGPIPE; children must not inherit it
  posix_spawnattr_setsigmask(&sa.attr, &none);

  if (!spec.cwd.empty()) posix_spawn_file_actions_addchdir_np(&sa.actions, spec.cwd.c_str());
  posix_spawn_file_actions_addopen(&sa.actions, 0, "/dev/null", O_RDONLY, 0);
  int out_fd = -1, pipe_fds[2] = {-1, -1};
  switch (spec.output) {
    case OutputMode::File:
      out_fd = ::open(spec.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (out_fd < 0)
        throw std::runtime_error(fmt::format("cannot open the log file '{}': {}", spec.log_path, std::strerror(errno)));
      posix_spawn_file_actions_adddup2(&sa.actions, out_fd, 1);
      posix_spawn_file_actions_adddup2(&sa.actions, out_fd, 2);
      break;
    case OutputMode::Pipe:
      if (pipe2(pipe_fds, O_CLOEXEC) != 0) throw std::runtime_error(fmt::format("pipe2: {}", std::strerror(errno)));
      posix_spawn_file_actions_adddup2(&sa.actions, pipe_fds[1], 1);
      posix_spawn_file_actions_adddup2(&sa.actions, pipe_fds[1], 2);
      break;
    case OutputMode::Null:
      posix_spawn_file_actions_addopen(&sa.actions, 1, "/dev/null", O_WRONLY, 0);
      posix_spawn_file_actions_adddup2(&sa.actions, 1, 2);
      break;
    case OutputMode::Inherit:
      break;
  }
  std::vector<char*> argv, envp;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : spec.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  pid_t pid = -1;
  const std::string& program = spec.program.empty() ? spec.argv[0] : spec.program;
  const bool search = program.find('/') == std::string::npos;
  int rc = search ? posix_spawnp(&pid, program.c_str(), &sa.actions, &sa.attr, argv.data(), envp.data())
                  : posix_spawn(&pid, program.c_str(), &sa.actions, &sa.attr, argv.data(), envp.data());
  if (out_fd >= 0) ::close(out_fd);
  if (pipe_fds[1] >= 0) ::close(pipe_fds[1]);
  if (rc != 0) {
    if (pipe_fds[0] >= 0) ::close(pipe_fds[0]);
    throw std::runtime_error(fmt::format("cannot start '{}'{}: {}", spec.argv[0],
                                         spec.cwd.empty() ? "" : fmt::format(" in '{}'", spec.cwd), std::strerror(rc)));
  }
  Child c;
  c.pid = pid;
  c.pidfd = open_pidfd(pid);
  if (pipe_fds[0] >= 0) {
    fcntl(pipe_fds[0], F_SETFL, fcntl(pipe_fds[0], F_GETFL) | O_NONBLOCK);
    c.output_fd = pipe_fds[0];
  }
  return c;
}

std::optional<ExitStatus> reap_group(pid_t pid) {
  siginfo_t si;
  std::memset(&si, 0, sizeof si);
  int r;
  do r = ::waitid(P_PID, static_cast<id_t>(pid), &si, WEXITED | WNOHANG | WNOWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0) return ExitStatus{};  // ECHILD: reaped elsewhere; status unknown
  if (si.si_pid == 0) return std::nullopt;
  signal_group(pid, SIGKILL);  // leftovers of the group (background children); the zombie keeps the id
  return reap(pid);
}

std::optional<ExitStatus> try_reap(pid_t pid) {
  int status = 0;
  pid_t r;
  do r = ::waitpid(pid, &status, WNOHANG);
  while (r < 0 && errno == EINTR);
  if (r == 0) return std::nullopt;
  if (r < 0) return ExitStatus{};  // ECHILD: reaped elsewhere; status unknown
  return decode(status);
}

ExitStatus reap(pid_t pid) {
  int status = 0;
  pid_t r;
  do r = ::waitpid(pid, &status, 0);
  while (r < 0 && errno == EINTR);
  if (r < 0) return ExitStatus{};
  return decode(status);
}

bool signal_group(pid_t pgid, int sig) {
  if (pgid <= 1) return false;
  return ::kill(-pgid, sig) == 0;
}

void close_child(Child& c) {
  if (c.pidfd >= 0) ::close(c.pidfd);
  if (c.output_fd >= 0) ::close(c.output_fd);
  c.pidfd = c.output_fd = -1;
}

std::string resolve_program(const std::string& name, const std::string& cwd, int& err) {
  err = 0;
  if (name.empty() || name.find('/') != std::string::npos) return name;
  const char* path = ::getenv("PATH");
  std::string_view dirs = path ? path : "/bin:/usr/bin";
  bool denied = false;
  std::size_t pos = 0;
  for (;;) {
    std::size_t colon = dirs.find(':', pos);
    std::string_view dir = dirs.substr(pos, colon == std::string_view::npos ? std::string_view::npos : colon - pos);
    std::string cand = dir.empty() ? name : std::string(dir) + "/" + name;  // empty entry: the current directory
    std::string check = cand;
    if (cand[0] != '/' && !cwd.empty()) check = cwd + "/" + cand;
    struct stat st;
    if (::stat(check.c_str(), &st) == 0) {
      if (S_ISREG(st.st_mode) && ::access(check.c_str(), X_OK) == 0) return dir.empty() ? "./" + name : cand;
      denied = true;  // execve would fail with EACCES; execvp goes on searching and reports EACCES at the end
    }
    if (colon == std::string_view::npos) break;
    pos = colon + 1;
  }
  err = denied ? EACCES : ENOENT;
  return name;
}

// ---- Launcher: see Note [Launcher threads] in process.h ------------------------------------------

Launcher::Launcher(int threads, std::function<void(pid_t)> spawned) : spawned_(std::move(spawned)) {
  efd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd_ < 0) throw std::runtime_error(fmt::format("eventfd: {}", std::strerror(errno)));
  // The threads inherit this mask: every signal blocked, so signals keep going to the other threads
  // (Python's SIGINT handling, the dispatcher's wake-up fd) and never interrupt a spawn.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  try {
    for (int i = 0; i < std::max(1, threads); ++i) threads_.emplace_back([this] { worker(); });
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
    ::close(efd_);
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

Launcher::~Launcher() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;  // the queued jobs still run: a submitted launch always gets its result
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
  // Results nobody took: their children must not be left running or unreaped.
  for (auto& d : done_)
    if (d.child.pid > 0) {
      signal_group(d.child.pid, SIGKILL);
      reap(d.child.pid);
      close_child(d.child);
    }
  ::close(efd_);
}

void Launcher::submit(std::uint64_t id, LaunchSpec spec) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    jobs_.emplace_back(id, std::move(spec));
    ++in_flight_;
  }
  work_cv_.notify_one();
}

void Launcher::worker() {
  for (;;) {
    std::pair<std::uint64_t, LaunchSpec> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stop_ and nothing left
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    Done d;
    d.id = job.first;
    try {
      d.child = launch(job.second);
      if (spawned_) spawned_(d.child.pid);
    } catch (const std::exception& ex) {
      d.child = Child{};
      d.error = ex.what();
    }
    bool first;
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_.push_back(std::move(d));
      first = done_.size() == 1;
      if (--in_flight_ == 0) idle_cv_.notify_all();
    }
    if (first) {
      std::uint64_t one = 1;
      [[maybe_unused]] ssize_t w = ::write(efd_, &one, sizeof one);
    }
  }
}

std::vector<Launcher::Done> Launcher::take() {
  std::uint64_t v;
  [[maybe_unused]] ssize_t r = ::read(efd_, &v, sizeof v);  // reset before looking (a later push writes again)
  std::vector<Done> out;
  std::lock_guard<std::mutex> lk(mu_);
  out.swap(done_);
  return out;
}

void Launcher::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  idle_cv_.wait(lk, [&] { return in_flight_ == 0; });
}

std::vector<std::string> current_environment(const std::vector<std::string>& drop) {
  std::vector<std::string> out;
  for (char** e = environ; e && *e; ++e) {
    std::string_view entry(*e);
    auto eq = entry.find('=');
    std::string_view name = entry.substr(0, eq);
    bool dropped = false;
    for (const auto& d : drop)
      if (name == d) dropped = true;
    if (!dropped) out.emplace_back(entry);
  }
  return out;
}

namespace {
struct LinuxDirent64 {
  ino64_t d_ino;
  off64_t d_off;
  unsigned short d_reclen;
  unsigned char d_type;
  char d_name[];
};

// Writes the decimal `v` into `out` (no allocation), returns the end pointer.
char* write_uint(char* out, unsigned long v) {
  char tmp[24];
  int n = 0;
  do tmp[n++] = static_cast<char>('0' + v % 10);
  while ((v /= 10) != 0);
  while (n) *out++ = tmp[--n];
  return out;
}

// True when /proc/<pid>/environ holds exactly the entry `marker`.
bool environ_has(const char* pid_name, const char* marker, std::size_t marker_len) {
  char path[64] = "/proc/";
  std::size_t i = 6;
  for (const char* p = pid_name; *p && i < 50; ++p) path[i++] = *p;
  const char* tail = "/environ";
  for (const char* p = tail; *p; ++p) path[i++] = *p;
  path[i] = 0;
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[4096];
  std::size_t pos = 0;  // position inside the current entry
  bool match = true;    // the current entry matches marker so far
  bool found = false;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (ssize_t k = 0; k < n; ++k) {
      char c = buf[k];
      if (c == 0) {
        if (match && pos == marker_len) found = true;
        pos = 0;
        match = true;
      } else {
        if (match && (pos >= marker_len || marker[pos] != c)) match = false;
        ++pos;
      }
    }
    if (found) break;
  }
  ::close(fd);
  return found;
}
}  // namespace

int kill_marked_processes(const char* marker, int sig) {
  std::size_t len = std::strlen(marker);
  if (len == 0) return 0;
  int dfd = ::open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return 0;
  const pid_t self = ::getpid();
  char self_name[24];
  *write_uint(self_name, static_cast<unsigned long>(self)) = 0;
  int count = 0;
  alignas(8) char buf[8192];
  for (;;) {
    long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
    if (n <= 0) break;
    for (long off = 0; off < n;) {
      auto* d = reinterpret_cast<LinuxDirent64*>(buf + off);
      off += d->d_reclen;
      const char* name = d->d_name;
      if (name[0] < '0' || name[0] > '9') continue;
      bool numeric = true;
      long pid = 0;
      for (const char* p = name; *p; ++p) {
        if (*p < '0' || *p > '9') numeric = false;
        else pid = pid * 10 + (*p - '0');
      }
      if (!numeric || pid == self) continue;
      if (environ_has(name, marker, len) && ::kill(static_cast<pid_t>(pid), sig) == 0) ++count;
    }
  }
  ::close(dfd);
  return count;
}

}  // namespace gpufleet::dispatch
