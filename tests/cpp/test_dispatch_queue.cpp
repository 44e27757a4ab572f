// The dispatcher as a long-lived queue uses it (Note [Open input] in dispatch/scheduler.cpp): an open
// input that is fed while the run goes on, cancel_task() for one queued or running task, attempt
// numbers that continue a count, output claims that end with their task. Real child processes; the
// hooks are called from the run loop's thread while this thread feeds and cancels (TSan runs it).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "dispatch/scheduler.h"

using namespace gpufleet::dispatch;
using namespace std::chrono_literals;

namespace {

TaskSpec sh(std::int64_t seq, const std::string& script) {
  TaskSpec t;
  t.seq = seq;
  t.key = "job-" + std::to_string(seq);
  t.name = "job" + std::to_string(seq);
  t.argv = {"/bin/sh", "-c", script};
  return t;
}

// A queue fed by the test's thread: pull hands out what was pushed; events are kept with the time
// they arrived. Everything under one mutex, as a host would do it.
struct Feed {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<TaskSpec> waiting;
  std::vector<TaskEvent> events;
  std::atomic<int> pulls{0}, empty_pulls{0};

  DispatchHooks hooks() {
    DispatchHooks h;
    h.pull = [this](std::size_t max) {
      std::lock_guard<std::mutex> lk(mu);
      ++pulls;
      std::vector<TaskSpec> out;
      while (!waiting.empty() && out.size() < max) {
        out.push_back(waiting.front());
        waiting.pop_front();
      }
      if (out.empty()) ++empty_pulls;
      return out;
    };
    h.on_events = [this](std::vector<TaskEvent>& evs) {
      std::lock_guard<std::mutex> lk(mu);
      events.insert(events.end(), evs.begin(), evs.end());
      cv.notify_all();
    };
    return h;
  }
  void push(TaskSpec t) {
    std::lock_guard<std::mutex> lk(mu);
    waiting.push_back(std::move(t));
  }
  // Waits for an event of `kind` for `seq` (final ones only for Finished); returns it.
  TaskEvent wait_for(std::int64_t seq, EventKind kind, std::chrono::seconds limit = 20s) {
    std::unique_lock<std::mutex> lk(mu);
    TaskEvent found;
    bool ok = cv.wait_for(lk, limit, [&] {
      for (const auto& e : events)
        if (e.seq == seq && e.kind == kind && (kind != EventKind::Finished || e.final)) {
          found = e;
          return true;
        }
      return false;
    });
    EXPECT_TRUE(ok) << "no event of kind " << static_cast<int>(kind) << " for task " << seq;
    return found;
  }
  std::vector<TaskEvent> of(std::int64_t seq) {
    std::lock_guard<std::mutex> lk(mu);
    std::vector<TaskEvent> out;
    for (const auto& e : events)
      if (e.seq == seq) out.push_back(e);
    return out;
  }
};

DispatchOptions open_options(int devices, int slots) {
  DispatchOptions o;
  for (int i = 0; i < devices; ++i) o.devices.push_back({i, i, std::to_string(i), "sim"});
  o.slots_per_device = slots;
  o.output = OutputMode::Null;
  o.keep_open = true;
  o.event_interval_s = 0.0;
  o.kill_grace_s = 2.0;
  o.retry_backoff_s = 0.01;
  return o;
}

}  // namespace

TEST(DispatchQueue, OpenInputWaitsForMoreAndEndsWhenClosed) {
  Feed f;
  Dispatcher d(open_options(1, 1), f.hooks());
  RunTotals totals;
  std::thread loop([&] { totals = d.run(); });
  // Nothing to do: the run stays up without pulling in a busy loop.
  std::this_thread::sleep_for(600ms);
  EXPECT_LE(f.pulls.load(), 5) << "an empty open input must not be pulled in a loop";
  f.push(sh(0, "exit 0"));
  d.notify_input();
  EXPECT_EQ(f.wait_for(0, EventKind::Finished).status, TaskStatus::Succeeded);
  f.push(sh(1, "exit 4"));
  d.notify_input();
  auto e = f.wait_for(1, EventKind::Finished);
  EXPECT_EQ(e.status, TaskStatus::Failed);
  EXPECT_EQ(e.exit_code.value_or(-1), 4);
  d.close_input();
  loop.join();
  EXPECT_EQ(totals.succeeded, 1);
  EXPECT_EQ(totals.failed, 1);
  EXPECT_FALSE(totals.drained || totals.cancelled);
}

TEST(DispatchQueue, CancelTaskStopsOneRunningAndRemovesOneQueued) {
  Feed f;
  Dispatcher d(open_options(1, 1), f.hooks());
  std::thread loop([&] { d.run(); });
  const auto dir = std::filesystem::temp_directory_path() / ("gf-cancel-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string pidfile = (dir / "pid").string();
  // task 0 runs (and ignores SIGTERM in its shell: the kill sequence still ends it); task 1 waits
  // for the one slot; task 2 runs after both.
  f.push(sh(0, "trap '' TERM; echo $$ > " + pidfile + "; sleep 30 & wait"));
  f.push(sh(1, "exit 0"));
  f.push(sh(2, "exit 0"));
  d.notify_input();
  f.wait_for(0, EventKind::Started);
  d.cancel_task(1);  // queued: removed, never started
  auto e1 = f.wait_for(1, EventKind::Finished);
  EXPECT_EQ(e1.status, TaskStatus::Cancelled);
  for (const auto& e : f.of(1)) EXPECT_NE(e.kind, EventKind::Started);
  // Started means exec'd, not that the shell has run its trap: wait for its pid (written after the
  // trap), or SIGTERM could end it before it ignores SIGTERM, and the pid would never be written
  pid_t pid = 0;
  for (auto end = std::chrono::steady_clock::now() + 10s; pid <= 0 && std::chrono::steady_clock::now() < end;) {
    std::ifstream in(pidfile);
    if (!(in >> pid)) pid = 0;
    if (pid <= 0) std::this_thread::sleep_for(10ms);
  }
  EXPECT_GT(pid, 0);
  auto t0 = std::chrono::steady_clock::now();
  d.cancel_task(0);  // running: SIGTERM (ignored), SIGKILL after the grace
  auto e0 = f.wait_for(0, EventKind::Finished);
  EXPECT_EQ(e0.status, TaskStatus::Cancelled);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_EQ(f.wait_for(2, EventKind::Finished).status, TaskStatus::Succeeded);  // the others go on
  d.cancel_task(2);   // finished: nothing happens
  d.cancel_task(99);  // never pulled: nothing happens
  if (pid > 0) EXPECT_NE(::kill(pid, 0), 0) << "the cancelled task's shell still runs";
  d.close_input();
  loop.join();
  EXPECT_EQ(f.of(2).size(), 2u);  // started, finished: a late cancel did not touch it
  std::filesystem::remove_all(dir);
}

TEST(DispatchQueue, FirstAttemptContinuesTheCountAndBoundsRetries) {
  Feed f;
  Dispatcher d(open_options(2, 1), f.hooks());
  std::thread loop([&] { d.run(); });
  TaskSpec t = sh(5, "exit 1");
  t.first_attempt = 3;  // two attempts were made before (by an earlier run of a queue)
  t.retries = 1;
  f.push(t);
  TaskSpec bad = sh(6, "exit 0");
  bad.first_attempt = 0;
  f.push(bad);
  d.notify_input();
  f.wait_for(5, EventKind::Finished);
  std::vector<int> attempts;
  for (const auto& e : f.of(5))
    if (e.kind == EventKind::Started) attempts.push_back(e.attempt);
  EXPECT_EQ(attempts, (std::vector<int>{3, 4}));
  auto e6 = f.wait_for(6, EventKind::Finished);
  EXPECT_EQ(e6.status, TaskStatus::Failed);
  EXPECT_NE(e6.message.find("first_attempt"), std::string::npos);
  d.close_input();
  loop.join();
}

TEST(DispatchQueue, OutputClaimsEndWithTheirTask) {
  // Two jobs writing one file at different times are fine in an open run; at the same time they are not.
  Feed f;
  Dispatcher d(open_options(2, 1), f.hooks());
  std::thread loop([&] { d.run(); });
  const auto dir = std::filesystem::temp_directory_path() / ("gf-claims-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string out = (dir / "out.txt").string(), tmp = (dir / ".out.gfpart.txt").string();
  auto writer = [&](std::int64_t seq, const std::string& text, const std::string& extra) {
    TaskSpec t = sh(seq, extra + "echo " + text + " > " + tmp);
    t.outputs.push_back({out, tmp});
    return t;
  };
  f.push(writer(0, "first", ""));
  d.notify_input();
  EXPECT_EQ(f.wait_for(0, EventKind::Finished).status, TaskStatus::Succeeded);
  f.push(writer(1, "second", "sleep 1; "));
  f.push(writer(2, "third", ""));
  d.notify_input();
  EXPECT_EQ(f.wait_for(1, EventKind::Finished).status, TaskStatus::Succeeded);
  auto e2 = f.wait_for(2, EventKind::Finished);
  EXPECT_EQ(e2.status, TaskStatus::Failed);  // claimed by task 1 while it ran
  EXPECT_NE(e2.message.find("also the output of task 2"), std::string::npos) << e2.message;
  std::ifstream in(out);
  std::string text;
  in >> text;
  EXPECT_EQ(text, "second");
  d.close_input();
  loop.join();
  std::filesystem::remove_all(dir);
}
