// The dispatcher core without Python: the run loop with real child processes, timeouts, memory
// admission through a memory hook, the supervisor surviving a SIGKILLed owner and replaced when
// killed itself, output collisions, per-run log files, the journal refusing other files.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "dispatch/journal.h"
#include "dispatch/process.h"
#include "dispatch/scheduler.h"
#include "dispatch/supervisor.h"
#include "dispatch_test_util.h"

using namespace gpufleet::dispatch;
using namespace gpufleet::dispatch::test_util;

namespace {

struct Collected {
  std::vector<TaskEvent> events;
  std::vector<TaskEvent> finished() const {
    std::vector<TaskEvent> out;
    for (const auto& e : events)
      if (e.kind == EventKind::Finished && e.final) out.push_back(e);
    return out;
  }
};

// Hooks that hand out `tasks` (counting them in `next`) and append the events to `events` under `mu`
// (the test's thread may read them while the run goes on).
DispatchHooks list_hooks(const std::vector<TaskSpec>& tasks, std::size_t& next, std::vector<TaskEvent>& events,
                         std::mutex* mu = nullptr) {
  DispatchHooks h;
  h.pull = [&tasks, &next](std::size_t max) {
    std::vector<TaskSpec> out;
    while (next < tasks.size() && out.size() < max) out.push_back(tasks[next++]);
    return out;
  };
  h.on_events = [&events, mu](std::vector<TaskEvent>& evs) {
    std::unique_lock<std::mutex> lk;
    if (mu) lk = std::unique_lock<std::mutex>(*mu);
    events.insert(events.end(), evs.begin(), evs.end());
  };
  return h;
}

RunTotals run_tasks(std::vector<TaskSpec> tasks, DispatchOptions o, Collected& c,
                    std::function<std::vector<MemoryReading>()> memory = {}) {
  std::size_t next = 0;
  DispatchHooks h = list_hooks(tasks, next, c.events);
  h.memory = std::move(memory);
  Dispatcher d(std::move(o), std::move(h));
  return d.run();
}

bool alive(pid_t p) { return ::kill(p, 0) == 0; }

}  // namespace

TEST(Dispatch, RunsEveryTaskOnItsDeviceWithinSlots) {
  DispatchOptions o;
  o.devices = fake_pool(3);
  o.slots_per_device = 2;
  o.output = OutputMode::Null;
  std::vector<TaskSpec> tasks;
  for (int i = 0; i < 23; ++i) tasks.push_back(sh(i, i % 5 == 4 ? "exit 3" : "sleep 0.0$((RANDOM % 5))"));
  Collected c;
  RunTotals t = run_tasks(tasks, o, c);
  EXPECT_EQ(t.succeeded + t.failed, 23);
  EXPECT_EQ(t.failed, 4);
  // replay the events: never more than 2 running per device
  std::map<int, int> running;
  for (const auto& e : c.events) {
    if (e.kind == EventKind::Started) {
      ASSERT_EQ(e.devices.size(), 1u);
      EXPECT_LE(++running[e.devices[0]], 2);
    } else if (e.kind == EventKind::Finished) {
      --running[e.devices[0]];
    }
  }
  for (const auto& e : c.finished())
    if (e.seq % 5 == 4) EXPECT_EQ(e.exit_code.value_or(-1), 3);
}

TEST(Dispatch, TimeoutStopsTheGroup) {
  DispatchOptions o;
  o.devices = fake_pool(1);
  o.output = OutputMode::Null;
  o.kill_grace_s = 0.2;
  TaskSpec t = sh(0, "trap '' TERM; sleep 30");
  t.timeout_s = 0.2;
  Collected c;
  auto start = std::chrono::steady_clock::now();
  RunTotals r = run_tasks({t}, o, c);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
  EXPECT_EQ(r.failed, 1);
  auto f = c.finished();
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].status, TaskStatus::TimedOut);
  EXPECT_EQ(f[0].signal.value_or(0), SIGKILL);  // it ignored SIGTERM
}

TEST(Dispatch, MemoryAdmissionUsesTheReading) {
  DispatchOptions o;
  o.devices = fake_pool(2);
  o.slots_per_device = 3;
  o.output = OutputMode::Null;
  o.memory_poll_s = 0.01;
  std::vector<TaskSpec> tasks;
  for (int i = 0; i < 6; ++i) {
    tasks.push_back(sh(i, "sleep 0.05"));
    tasks.back().min_free_memory = 5ull << 30;
  }
  Collected c;
  auto memory = [] {
    return std::vector<MemoryReading>{{1ull << 30, 80ull << 30}, {40ull << 30, 12ull << 30}};
  };
  RunTotals r = run_tasks(tasks, o, c, memory);
  EXPECT_EQ(r.succeeded, 6);
  int running = 0;
  for (const auto& e : c.events) {
    if (e.kind == EventKind::Started) {
      EXPECT_EQ(e.devices[0], 1);       // device 0 never has 5 GiB free
      EXPECT_LE(++running, 2);          // device 1: 12 GiB total / 5 GiB per task
    } else if (e.kind == EventKind::Finished) {
      --running;
    }
  }
}

TEST(Dispatch, SupervisorCleansUpAfterSigkilledOwner) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t owner = fork();
  ASSERT_GE(owner, 0);
  if (owner == 0) {
    // the "dispatcher": a supervisor, a task group with a setsid grandchild, then wait to be killed
    Supervisor sup("GPUFLEET_RUN_ID=gtest" + random_token(), 0.3);
    LaunchSpec ls;
    ls.argv = {"/bin/sh", "-c", "setsid sleep 60 & echo $! >&3; sleep 60 & echo $! >&3; echo $$ >&3; wait"};
    ls.env = current_environment({});
    ls.env.push_back(sup.marker());
    ::dup2(fds[1], 3);
    ls.output = OutputMode::Inherit;
    Child ch = launch(ls);
    sup.track(ch.pid);
    for (;;) pause();
  }
  ::close(fds[1]);
  std::vector<pid_t> pids;
  std::string buf;
  char tmp[256];
  while (pids.size() < 3) {
    ssize_t n = ::read(fds[0], tmp, sizeof tmp);
    ASSERT_GT(n, 0);
    buf.append(tmp, n);
    pids.clear();
    std::size_t pos = 0, nl;
    while ((nl = buf.find('\n', pos)) != std::string::npos) {
      pids.push_back(std::stoi(buf.substr(pos, nl - pos)));
      pos = nl + 1;
    }
  }
  ::close(fds[0]);
  for (pid_t p : pids) EXPECT_TRUE(alive(p));
  ::kill(owner, SIGKILL);
  ::waitpid(owner, nullptr, 0);
  bool gone = false;
  for (int i = 0; i < 250 && !gone; ++i) {
    gone = true;
    for (pid_t p : pids) {
      // zombies of the owner's children are reaped by init; a live one still answers kill(0) and
      // shows a state other than Z in /proc
      std::ifstream st("/proc/" + std::to_string(p) + "/stat");
      std::string line;
      if (std::getline(st, line)) {
        auto rp = line.rfind(')');
        if (rp != std::string::npos && rp + 2 < line.size() && line[rp + 2] != 'Z') gone = false;
      }
    }
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(gone) << "a task process survived its SIGKILLed dispatcher";
}

namespace {

// Every task has exactly one final outcome; every started attempt finishes exactly once, after its
// Started event; and no process of the run is left (group members included) or left unreaped.
void check_accounting(const Collected& c, int n, const RunTotals& t) {
  std::map<std::int64_t, int> finals, open;
  std::vector<pid_t> pids;
  for (const auto& e : c.events) {
    if (e.kind == EventKind::Message) continue;
    ASSERT_GE(e.seq, 0);
    ASSERT_LT(e.seq, n);
    if (e.kind == EventKind::Started) {
      EXPECT_EQ(open[e.seq]++, 0) << "task " << e.seq << " started twice without finishing";
      if (e.pid > 0) pids.push_back(static_cast<pid_t>(e.pid));
    } else if (e.kind == EventKind::Finished) {
      if (e.pid != 0 || e.attempt > 0) EXPECT_EQ(open[e.seq]--, 1) << "task " << e.seq << " finished unstarted";
      if (e.final) ++finals[e.seq];
    } else {
      ++finals[e.seq];  // skipped, not started
    }
  }
  for (int i = 0; i < n; ++i) EXPECT_EQ(finals[i], 1) << "task " << i;
  for (const auto& [seq, o] : open) EXPECT_EQ(o, 0) << "task " << seq << " never finished";
  EXPECT_EQ(t.succeeded + t.failed + t.skipped + t.not_started, n);
  // members of the tasks' groups still running (zombies do not count: orphans are reaped by init)
  auto live_members = [&] {
    std::vector<pid_t> out;
    std::set<pid_t> groups(pids.begin(), pids.end());
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      std::ifstream st(entry.path() / "stat");
      std::string line;
      if (!std::getline(st, line)) continue;
      auto rp = line.rfind(')');
      if (rp == std::string::npos) continue;
      std::istringstream rest(line.substr(rp + 2));
      char state;
      long ppid, pgrp;
      if (rest >> state >> ppid >> pgrp && state != 'Z' && groups.count(static_cast<pid_t>(pgrp)))
        out.push_back(static_cast<pid_t>(std::stol(entry.path().filename().string())));
    }
    return out;
  };
  std::vector<pid_t> left = live_members();
  for (int i = 0; i < 50 && !left.empty(); ++i) {  // SIGKILL is delivered, the exit takes a moment
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    left = live_members();
  }
  EXPECT_TRUE(left.empty()) << left.size() << " processes of the run's groups outlived their tasks, e.g. " << left[0];
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1) << "an unreaped child is left";
  EXPECT_EQ(errno, ECHILD);
}

std::vector<TaskSpec> burst(int n) {
  std::vector<TaskSpec> tasks;
  for (int i = 0; i < n; ++i) {
    switch (i % 5) {
      case 0: tasks.push_back(sh(i, "exit 0")); break;
      case 1: tasks.push_back(sh(i, "exit 1")); break;
      case 2:  // times out: a group with a background member and a leader that ignores SIGTERM
        tasks.push_back(sh(i, "trap '' TERM; sleep 5 & sleep 5; wait"));
        tasks.back().timeout_s = 0.05;
        break;
      case 3: tasks.push_back(sh(i, "true")); tasks.back().argv = {"true"}; break;  // found through PATH
      default: tasks.push_back(sh(i, "")); tasks.back().argv = {"gpufleet-no-such-program"}; break;
    }
    tasks.back().retries = i % 7 == 1 ? 1 : 0;
  }
  return tasks;
}

DispatchOptions burst_options() {
  DispatchOptions o;
  o.devices = fake_pool(4);
  o.slots_per_device = 2;
  o.output = OutputMode::Null;
  o.kill_grace_s = 0.05;
  o.retry_backoff_s = 0.001;
  o.quarantine_after = 0;
  o.launch_threads = 4;
  return o;
}

}  // namespace

TEST(Dispatch, LauncherThreadsAccountForABurstOfShortTasks) {
  const int n = 300;
  Collected c;
  RunTotals t = run_tasks(burst(n), burst_options(), c);
  check_accounting(c, n, t);
  EXPECT_EQ(t.not_started, 0);
  EXPECT_EQ(t.succeeded, 2 * n / 5);
  for (const auto& e : c.finished()) {
    if (e.seq % 5 == 2) EXPECT_EQ(e.status, TaskStatus::TimedOut) << e.seq;
    if (e.seq % 5 == 4) EXPECT_NE(e.message.find("No such file or directory"), std::string::npos) << e.message;
  }
  // Started events come in queue order: a task's first attempt never starts before an earlier task's
  std::int64_t last = -1;
  for (const auto& e : c.events)
    if (e.kind == EventKind::Started && e.attempt == 1) {
      EXPECT_GT(e.seq, last);
      last = e.seq;
    }
}

TEST(Dispatch, CancelDuringABurstOfLaunchesLeavesNothing) {
  for (int round = 0; round < 3; ++round) {
    const int n = 400;
    DispatchHooks h;
    std::vector<TaskSpec> tasks = burst(n);
    if (round < 2)  // long tasks: only the cancel (also of one still being launched) ends them early
      for (auto& t : tasks)
        if (t.seq % 5 == 0) t.argv = {"/bin/sh", "-c", "sleep 30"};
    std::size_t next = 0;
    Collected c;
    Dispatcher* self = nullptr;
    h.pull = [&](std::size_t max) {
      // round 0: cancel from the first pull; the run loop still schedules (it sees the request at its
      // next turn), so the first launches are in flight on the launcher threads when the cancel lands
      if (round == 0 && next == 0) {
        self->interrupt();
        self->interrupt();
      }
      std::vector<TaskSpec> out;
      while (next < tasks.size() && out.size() < max) out.push_back(tasks[next++]);
      return out;
    };
    std::atomic<int> started{0};
    h.on_events = [&](std::vector<TaskEvent>& evs) {
      for (const auto& e : evs) started += e.kind == EventKind::Started;
      c.events.insert(c.events.end(), evs.begin(), evs.end());
    };
    DispatchOptions o = burst_options();
    o.event_interval_s = 0.001;  // `started` follows the launches closely
    Dispatcher d(o, std::move(h));
    self = &d;
    // round 1: drain then cancel in the middle of the burst; round 2: drain only
    std::thread stopper([&] {
      if (round == 0) return;
      for (int i = 0; i < 5000 && started.load() < 40; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      d.interrupt();
      if (round == 1) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        d.interrupt();
      }
    });
    auto t0 = std::chrono::steady_clock::now();
    RunTotals t = d.run();
    stopper.join();
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
    if (round < 2)
      for (const auto& e : c.finished())
        if (e.seq % 5 == 0 && e.kind == EventKind::Finished) EXPECT_EQ(e.status, TaskStatus::Cancelled) << e.seq;
    ASSERT_LE(next, tasks.size());
    check_accounting(c, static_cast<int>(next), t);  // a drain stops reading the input
    EXPECT_EQ(t.cancelled, round < 2);
    EXPECT_TRUE(t.cancelled || t.drained);
    EXPECT_GT(t.not_started, 0);
  }
}

TEST(Dispatch, ResolveProgramSearchesPathLikeExecvp) {
  char tmpl[] = "/tmp/gf-resolve-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string root = tmpl;
  auto mk = [](const std::string& p, bool exec) {
    std::ofstream(p) << "#!/bin/sh\n";
    ::chmod(p.c_str(), exec ? 0755 : 0644);
  };
  for (const char* d : {"/a", "/b", "/c", "/w", "/w/rel"}) ::mkdir((root + d).c_str(), 0755);
  ::mkdir((root + "/a/prog").c_str(), 0755);  // a directory named like the program: skipped
  mk(root + "/b/prog", false);                 // not executable: skipped, EACCES if nothing else
  mk(root + "/c/prog", true);
  mk(root + "/w/rel/relprog", true);
  const char* old = ::getenv("PATH");
  std::string saved = old ? old : "";
  int err = -1;
  ::setenv("PATH", (root + "/a:" + root + "/b:" + root + "/c").c_str(), 1);
  EXPECT_EQ(resolve_program("prog", "", err), root + "/c/prog");
  EXPECT_EQ(err, 0);
  ::setenv("PATH", (root + "/a:" + root + "/b").c_str(), 1);
  resolve_program("prog", "", err);
  EXPECT_EQ(err, EACCES);
  resolve_program("missing", "", err);
  EXPECT_EQ(err, ENOENT);
  EXPECT_EQ(resolve_program("./x/prog", "", err), "./x/prog");  // a name with '/' is not searched
  EXPECT_EQ(err, 0);
  ::setenv("PATH", "rel", 1);  // a relative entry is relative to the task's directory
  EXPECT_EQ(resolve_program("relprog", root + "/w", err), "rel/relprog");
  EXPECT_EQ(err, 0);
  resolve_program("relprog", root, err);
  EXPECT_EQ(err, ENOENT);
  if (old) ::setenv("PATH", saved.c_str(), 1);
  else ::unsetenv("PATH");
  std::filesystem::remove_all(root);
}

TEST(Dispatch, LauncherReturnsEveryLaunchOnceAndReapsWhatIsNotTaken) {
  std::atomic<int> tracked{0};
  std::map<std::uint64_t, int> seen;
  {
    Launcher l(4, [&](pid_t) { ++tracked; });
    for (std::uint64_t id = 0; id < 200; ++id) {
      LaunchSpec ls;
      ls.argv = {id % 10 == 9 ? "/no/such/program" : "/bin/true"};
      ls.output = OutputMode::Null;
      l.submit(id, std::move(ls));
    }
    std::size_t got = 0;
    while (got < 200) {
      pollfd p{l.fd(), POLLIN, 0};
      ASSERT_GE(::poll(&p, 1, 5000), 1) << "the launcher's fd never became readable";
      for (auto& d : l.take()) {
        ++got;
        ++seen[d.id];
        if (d.id % 10 == 9) {
          EXPECT_EQ(d.child.pid, -1);
          EXPECT_NE(d.error.find("/no/such/program"), std::string::npos);
        } else {
          ASSERT_GT(d.child.pid, 0) << d.error;
          EXPECT_EQ(reap(d.child.pid).exit_code.value_or(-1), 0);
          close_child(d.child);
        }
      }
    }
    // results never taken: the destructor kills and reaps them
    for (std::uint64_t id = 1000; id < 1010; ++id) {
      LaunchSpec ls;
      ls.argv = {"/bin/sleep", "30"};
      ls.output = OutputMode::Null;
      l.submit(id, std::move(ls));
    }
    l.wait_idle();
  }
  EXPECT_EQ(seen.size(), 200u);
  for (const auto& [id, k] : seen) EXPECT_EQ(k, 1) << id;
  EXPECT_EQ(tracked.load(), 180 + 10);
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

namespace {

// This process's children whose command line is a supervisor's title.
std::vector<pid_t> supervisor_children() {
  std::vector<pid_t> out;
  const std::string me = std::to_string(::getpid());
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    std::ifstream st(entry.path() / "stat");
    std::string line;
    if (!std::getline(st, line)) continue;
    auto rp = line.rfind(')');
    if (rp == std::string::npos) continue;
    std::istringstream rest(line.substr(rp + 2));
    char state;
    std::string ppid;
    if (!(rest >> state >> ppid) || ppid != me || state == 'Z') continue;
    std::ifstream cl(entry.path() / "cmdline");
    std::string cmd((std::istreambuf_iterator<char>(cl)), std::istreambuf_iterator<char>());
    if (cmd.rfind("gf-supervisor run ", 0) == 0) out.push_back(static_cast<pid_t>(std::stol(entry.path().filename())));
  }
  return out;
}

std::string temp_dir() {
  char tmpl[] = "/tmp/gf-dispatch-XXXXXX";
  return mkdtemp(tmpl);
}

}  // namespace

// Note [No process outlives the dispatcher]: the supervisor shows its own title, and a killed one is
// replaced while the run goes on (under ThreadSanitizer: the launcher threads' track() against the
// loop's restart()).
TEST(Dispatch, SupervisorIsRenamedAndReplacedWhenKilled) {
  DispatchOptions o;
  o.devices = fake_pool(2);
  o.slots_per_device = 2;
  o.output = OutputMode::Null;
  o.kill_grace_s = 0.2;
  std::vector<TaskSpec> tasks;
  for (int i = 0; i < 12; ++i) tasks.push_back(sh(i, i < 4 ? "sleep 30" : "sleep 0.0$((RANDOM % 3))"));
  std::mutex mu;
  std::vector<TaskEvent> events;
  std::size_t next = 0;
  o.event_interval_s = 0.01;
  Dispatcher d(o, list_hooks(tasks, next, events, &mu));
  RunTotals t;
  std::thread runner([&] { t = d.run(); });
  auto wait_until = [](auto pred) {
    for (int i = 0; i < 1000 && !pred(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return pred();
  };
  ASSERT_TRUE(wait_until([] { return supervisor_children().size() == 1; }));
  const pid_t first = supervisor_children()[0];
  ASSERT_TRUE(wait_until([&] {
    std::lock_guard<std::mutex> lk(mu);
    return std::count_if(events.begin(), events.end(), [](auto& e) { return e.kind == EventKind::Started; }) >= 4;
  }));
  ::kill(first, SIGKILL);
  EXPECT_TRUE(wait_until([&] {
    auto s = supervisor_children();
    return s.size() == 1 && s[0] != first;
  })) << "no new supervisor";
  d.cancel();
  runner.join();
  EXPECT_TRUE(t.cancelled);
  bool said = false;
  for (const auto& e : events)
    if (e.kind == EventKind::Message && e.message.find("died (killed by signal 9") != std::string::npos) said = true;
  EXPECT_TRUE(said);
  EXPECT_TRUE(supervisor_children().empty());
  errno = 0;
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

// Note [Output collisions]: the second claim of a file fails that task before it runs, whatever the
// spelling; per-run log files named by the 1-based task number.
TEST(Dispatch, CollidingOutputsAndPerRunLogFiles) {
  const std::string dir = temp_dir();
  std::filesystem::create_directories(dir + "/out");
  std::filesystem::create_symlink(dir + "/out", dir + "/alias");
  DispatchOptions o;
  o.devices = fake_pool(1);
  o.output = OutputMode::File;
  o.log_dir = dir + "/logs";
  std::vector<TaskSpec> tasks;
  for (int i = 0; i < 3; ++i) {
    tasks.push_back(sh(i, "echo task $0 > \"$1\"; echo log $0"));
    tasks.back().argv.push_back(std::to_string(i));
  }
  tasks[0].outputs = {{dir + "/out/x.txt", dir + "/out/.x.gfpart.txt"}};
  tasks[1].outputs = {{dir + "/alias/./x.txt", dir + "/alias/.x.gfpart.txt"}};
  tasks[2].outputs = {{dir + "/out/y.txt", dir + "/out/.y.gfpart.txt"}};
  for (auto& t : tasks) t.argv.push_back(t.outputs[0].temp_path);
  Collected c;
  RunTotals t = run_tasks(tasks, o, c);
  EXPECT_EQ(t.succeeded, 2);
  EXPECT_EQ(t.failed, 1);
  std::map<std::int64_t, TaskEvent> fin;
  for (const auto& e : c.finished()) fin[e.seq] = e;
  EXPECT_NE(fin[1].message.find("is also the output of task 1"), std::string::npos) << fin[1].message;
  EXPECT_EQ(fin[1].pid, 0);  // never started
  std::ifstream x(dir + "/out/x.txt");
  std::string line;
  std::getline(x, line);
  EXPECT_EQ(line, "task 0");
  for (std::int64_t s : {0, 2}) {
    EXPECT_EQ(fin[s].log_path, dir + "/logs/" + t.run_id + "/task-" + std::to_string(s + 1) + ".attempt-1.log");
    std::ifstream log(fin[s].log_path);
    std::getline(log, line);
    EXPECT_EQ(line, "log " + std::to_string(s));
  }
  std::filesystem::remove_all(dir);
}

// A file that is not a journal is refused (std::invalid_argument naming it) and left byte for byte.
TEST(Journal, RefusesWhatIsNotAJournalAndLeavesItUntouched) {
  const std::string dir = temp_dir();
  const std::string text = dir + "/notes.txt";
  std::ofstream(text) << "hello, not SQLite\n";
  try {
    Journal j(text);
    ADD_FAILURE() << "opened a text file as a journal";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("is not a gpufleet journal: it is not a readable SQLite database"),
              std::string::npos) << e.what();
  }
  std::ifstream in(text);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "hello, not SQLite");
  {
    Journal j(dir + "/j.sqlite");  // a new file becomes one, and opens again
    j.begin_run("r1", "test");
    EXPECT_FALSE(j.lookup("k").has_value());
  }
  Journal again(dir + "/j.sqlite");
  EXPECT_FALSE(again.succeeded("k"));
  EXPECT_THROW(Journal(dir + "/no/such/dir/j.sqlite"), std::invalid_argument);
  std::filesystem::remove_all(dir);
}
