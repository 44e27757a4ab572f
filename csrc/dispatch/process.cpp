// Child processes: posix_spawn into a new process group, reaping, group signals, marker scans.
#include "dispatch/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
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

ExitStatus decode(int status) {
  ExitStatus s;
  if (WIFEXITED(status)) s.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) s.signal = WTERMSIG(status);
  return s;
}

}  // namespace

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
  const bool search = spec.argv[0].find('/') == std::string::npos;
  int rc = search ? posix_spawnp(&pid, argv[0], &sa.actions, &sa.attr, argv.data(), envp.data())
                  : posix_spawn(&pid, argv[0], &sa.actions, &sa.attr, argv.data(), envp.data());
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
