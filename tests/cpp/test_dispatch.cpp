// The dispatcher core without Python: the run loop with real child processes, timeouts, memory
// admission through a memory hook, the supervisor surviving a SIGKILLed owner.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <thread>

#include "dispatch/process.h"
#include "dispatch/scheduler.h"
#include "dispatch/supervisor.h"

using namespace gpufleet::dispatch;

namespace {

std::vector<PoolDevice> fake_pool(int n) {
  std::vector<PoolDevice> p;
  for (int i = 0; i < n; ++i) p.push_back({i, i, std::to_string(i), "sim"});
  return p;
}

TaskSpec sh(std::int64_t seq, const std::string& script) {
  TaskSpec t;
  t.seq = seq;
  t.key = "k" + std::to_string(seq);
  t.name = "t" + std::to_string(seq);
  t.argv = {"/bin/sh", "-c", script};
  return t;
}

struct Collected {
  std::vector<TaskEvent> events;
  std::vector<TaskEvent> finished() const {
    std::vector<TaskEvent> out;
    for (const auto& e : events)
      if (e.kind == EventKind::Finished && e.final) out.push_back(e);
    return out;
  }
};

RunTotals run_tasks(std::vector<TaskSpec> tasks, DispatchOptions o, Collected& c,
                    std::function<std::vector<MemoryReading>()> memory = {}) {
  DispatchHooks h;
  std::size_t next = 0;
  h.pull = [&](std::size_t max) {
    std::vector<TaskSpec> out;
    while (next < tasks.size() && out.size() < max) out.push_back(tasks[next++]);
    return out;
  };
  h.on_events = [&](std::vector<TaskEvent>& evs) { c.events.insert(c.events.end(), evs.begin(), evs.end()); };
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
