// The dispatcher's run loop. One thread: poll() on pidfds (task exits), output pipes, a wake pipe,
// the launcher's eventfd and the interrupt fd; the Python layer is only entered through the hooks
// (pull tasks, events, interrupt checks), each of which takes the GIL briefly. The posix_spawn calls
// themselves run on a few launcher threads (Note [Launcher threads] in process.h); everything else,
// the run's state included, stays on this thread.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "common/error.h"
#include "common/printable.h"
#include "dispatch/scheduler_impl.h"

namespace gpufleet::dispatch {

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

const std::vector<std::string> kReservedVars = {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_TASK_ID",
                                                "GPUFLEET_TASK_NAME",   "GPUFLEET_DEVICE",   "GPUFLEET_SLOT",
                                                "GPUFLEET_ATTEMPT",     "GPUFLEET_RUN_ID"};

Dispatcher::Impl::Impl(DispatchOptions o, DispatchHooks h) : opt(std::move(o)), hooks(std::move(h)) {
  GF_CHECK_ARG(opt.slots_per_device >= 1, "slots_per_device must be at least 1, got {}", opt.slots_per_device);
  GF_CHECK_ARG(opt.kill_grace_s >= 0, "kill_grace must be >= 0 seconds, got {}", opt.kill_grace_s);
  GF_CHECK_ARG(opt.output != OutputMode::File || !opt.log_dir.empty(), "log files need a log directory");
  if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) throw std::runtime_error("pipe2 failed");
  token = random_token();
  run_id = opt.run_id.empty() ? token.substr(0, 12) : opt.run_id;
  GF_CHECK_ARG(run_id != "." && run_id != ".." && run_id.find('/') == std::string::npos &&
                   run_id.find('\0') == std::string::npos && run_id.size() <= 64,
               "run_id must be a file name of at most 64 bytes (no '/'), got '{}'", printable(run_id));
  marker = "GPUFLEET_RUN_ID=" + token;
}

Dispatcher::Impl::~Impl() {
  ::close(wake[0]);
  ::close(wake[1]);
}

void Dispatcher::Impl::poke() {
  char c = 1;
  [[maybe_unused]] ssize_t w = ::write(wake[1], &c, 1);
}

void Dispatcher::Impl::message(const std::string& text) {
  TaskEvent e;
  e.kind = EventKind::Message;
  e.message = text;
  e.start = e.end = epoch();
  events.push_back(std::move(e));
}

std::string Dispatcher::Impl::device_names(const std::vector<int>& ds) const {
  if (ds.empty()) return "cpu";
  std::string s;
  for (int d : ds) {
    if (!s.empty()) s += ",";
    s += fmt::format("cuda:{}", opt.devices[d].ordinal);
  }
  return s;
}

void Dispatcher::Impl::flush_events(bool force) {
  if (events.empty() || !hooks.on_events) {
    events.clear();
    return;
  }
  double now = mono();
  if (!force && now - last_flush < opt.event_interval_s && events.size() < 4096) return;
  last_flush = now;
  hooks.on_events(events);
  events.clear();
}

void Dispatcher::Impl::finish_unstarted(const TaskSpec& t, TaskStatus status, const std::string& why) {
  TaskEvent e;
  e.kind = status == TaskStatus::Skipped ? EventKind::Skipped
           : status == TaskStatus::NotStarted ? EventKind::NotStarted : EventKind::Finished;
  e.seq = t.seq;
  e.name = t.name;
  e.status = status;
  e.start = e.end = epoch();
  e.message = why;
  e.final = true;
  if (status == TaskStatus::Skipped) ++totals.skipped;
  else if (status == TaskStatus::NotStarted) ++totals.not_started;
  else {
    ++totals.failed;
    if (journal) journal->record_finish(t, e, "", run_id);
  }
  if (status != TaskStatus::NotStarted) release_outputs(t);
  events.push_back(std::move(e));
}

// Note [Open input]
// ~~~~~~~~~~~~~~~~~
// A run's input normally ends with the first empty pull. A queue that outlives its shell (the
// `gpufleet submit` daemon, python/gpufleet/queue/daemon.py) runs one dispatcher for as long as it
// lives instead, so that admission, quarantine, slots, the supervisor and the journal apply to jobs
// submitted at any time. With keep_open:
// - an empty pull means "nothing now": the loop stops pulling (no busy loop) until notify_input(),
//   which the host calls when a job is submitted or becomes ready, or until close_input(), after
//   which an empty pull ends the input as usual;
// - it pulls only while a slot is free, at most as many tasks as there are free slots, and again
//   whenever a task ends; the host's pull can ask free_slots() which kind is free and hand over only
//   what fits. So the host keeps the order of what waits (priorities), and a task it hands over
//   starts at once (or waits in the lookahead window, for memory, without blocking those behind);
// - cancel_task(seq) stops one task (the kill sequence, or its removal from the queue) without
//   touching the others; its Finished event says Cancelled;
// - the claims of Note [Output collisions] last as long as their task, not the run: a job submitted
//   tomorrow may write the file a finished job wrote today (the rename-time check against files this
//   run produced is off for the same reason; concurrent claims still refuse two jobs writing one file);
// - when every GPU is quarantined, GPU tasks wait (said once in a message) instead of failing: a
//   queue must not burn its backlog on a broken machine; restarting the host's dispatcher clears
//   quarantine.
void Dispatcher::Impl::cancel_tasks(double now) {
  if (!cancel_pending.exchange(false)) return;  // the usual case: no lock on the loop's path
  std::vector<std::int64_t> seqs;
  {
    std::lock_guard<std::mutex> lk(cancel_mu);
    seqs.swap(cancel_seqs);
  }
  for (std::int64_t seq : seqs) {
    for (auto& r : running)
      if (r.spec.seq == seq && !r.cancelled) {
        r.cancelled = true;  // a task still being launched is stopped by complete_start()
        stop_task(r, now);
      }
    for (auto it = queue.begin(); it != queue.end();) {
      if (it->spec.seq != seq) {
        ++it;
        continue;
      }
      finish_unstarted(it->spec, TaskStatus::Cancelled, "cancelled before it started");
      it = queue.erase(it);
    }
  }
}

void Dispatcher::Impl::handle_requests(double now) {
  cancel_tasks(now);
  if (cancel_req.load() && !cancel_seen) {
    cancel_seen = drain_seen = true;
    totals.cancelled = true;
    message(fmt::format("cancelling: stopping {} running task{} (SIGTERM, then SIGKILL after {:g} s)", running.size(),
                        running.size() == 1 ? "" : "s", opt.kill_grace_s));
    for (auto& r : running) {
      r.cancelled = true;
      stop_task(r, now);
    }
    flush_events(true);
  } else if (drain_req.load() && !drain_seen) {
    drain_seen = true;
    totals.drained = true;
    message(fmt::format("draining: {} running task{} will finish, nothing new starts (Ctrl-C again cancels them)",
                        running.size(), running.size() == 1 ? "" : "s"));
    flush_events(true);
  }
}

// ---- the loop ----------------------------------------------------------------------------------

RunTotals Dispatcher::Impl::run() {
  for (const auto& d : opt.devices) {
    (void)d;
    DevState s;
    s.busy.assign(opt.slots_per_device, false);
    devs.push_back(std::move(s));
  }
  int cpu = opt.cpu_slots > 0 ? opt.cpu_slots : std::max<int>(1, static_cast<int>(devs.size()) * opt.slots_per_device);
  cpu_busy.assign(cpu, false);
  if (opt.lookahead == 0) opt.lookahead = 4 * total_slots() + 16;
  if (opt.output == OutputMode::File) {
    // One directory per run: a later run never appends to (or points its journal at) an earlier
    // run's file with the same task number.
    run_log_dir = (std::filesystem::path(opt.log_dir) / run_id).string();
    std::error_code ec;
    std::filesystem::create_directories(run_log_dir, ec);
    if (ec)
      throw std::invalid_argument(
          fmt::format("cannot create the log directory '{}': {}", printable(run_log_dir), ec.message()));
  }
  base_env = current_environment(kReservedVars);
  if (!opt.journal_path.empty()) {
    journal = std::make_unique<Journal>(opt.journal_path);
    journal->begin_run(run_id, opt.description);
  }
  totals.run_id = run_id;
  supervisor = std::make_unique<Supervisor>(marker, opt.kill_grace_s);
  // Two threads already overlap the spawns on a 2-core machine; 4 to 16 (one per core) leave room.
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  int threads = opt.launch_threads > 0 ? opt.launch_threads
                                       : std::min<int>(static_cast<int>(total_slots()), std::clamp(cores, 4, 16));
  Supervisor* sup = supervisor.get();
  launcher = std::make_unique<Launcher>(threads, [sup](pid_t pid) { sup->track(pid); });
  try {
    loop();
  } catch (...) {
    abort_all();
    try {
      flush_events(true);
    } catch (...) {
    }
    launcher.reset();
    supervisor->close();
    if (journal) {
      try {
        journal->end_run(run_id, "error");
      } catch (...) {
      }
      journal.reset();
    }
    throw;
  }
  flush_events(true);
  launcher.reset();
  supervisor->close();
  if (journal) {
    journal->end_run(run_id, totals.cancelled ? "cancelled" : totals.drained ? "drained" : "finished");
    journal.reset();  // closed now, not when the Dispatcher object goes (a host may keep it)
  }
  return totals;
}

// On an exception: the kill sequence for every running task, synchronously.
void Dispatcher::Impl::abort_all() {
  // Launches in flight finish first (they are tracked by the supervisor as soon as they exist).
  while (!launching.empty()) {
    try {
      collect_launches(true);
    } catch (...) {  // a journal or event failure: that start was popped already and is stopped below
    }
  }
  double now = mono();
  for (auto& r : running) {
    r.cancelled = true;
    stop_task(r, now);
  }
  double until = now + opt.kill_grace_s;
  while (!running.empty()) {
    for (auto it = running.begin(); it != running.end();) {
      auto st = it->child.pid > 0 ? reap_group(it->child.pid) : std::optional<ExitStatus>(ExitStatus{});
      if (st) {
        auto next = std::next(it);
        const Running* reaped = &*it;
        try {
          finish(it, *st);
        } catch (...) {  // the journal or an event failed before finish() let go of the task: do it here,
                         // or this loop would wait for it forever
          for (auto j = running.begin(); j != running.end(); ++j)
            if (&*j == reaped) {
              running.erase(j);
              break;
            }
        }
        it = next;
      } else {
        ++it;
      }
    }
    if (mono() > until)
      for (auto& r : running) signal_group(r.child.pid, SIGKILL);
    if (!running.empty()) ::usleep(10000);
  }
}

void Dispatcher::Impl::loop() {
  std::vector<pollfd> fds;
  std::vector<std::list<Running>::iterator> owners;
  for (;;) {
    double now = mono();
    handle_requests(now);
    if (input_ready.exchange(false)) input_idle = false;
    if (wants_input()) pull_more();
    if (!stopping()) schedule(now);
    collect_launches(false, false);  // starts that failed before reaching the launcher (PATH search)
    if (running.empty()) {
      if (stopping()) {
        for (auto& p : queue)
          finish_unstarted(p.spec, TaskStatus::NotStarted,
                           cancel_seen ? "cancelled before it started" : "drained before it started");
        queue.clear();
        if (!source_done)
          message("the rest of the input was not read (drained or cancelled)");
        break;
      }
      if (source_done && queue.empty()) break;
    }
    // timers (an open run with nothing to do sleeps longer: notify_input() and the hooks wake it)
    double timeout = input_idle && running.empty() && queue.empty() ? 0.5 : 0.05;
    bool waiting_memory = false;
    for (const auto& p : queue) {
      if (p.not_before > now) timeout = std::min(timeout, p.not_before - now);
      if (p.spec.min_free_memory > 0) waiting_memory = true;
    }
    if (waiting_memory) timeout = std::min(timeout, std::max(0.0, last_mem_read + opt.memory_poll_s - now));
    if (!events.empty()) timeout = std::min(timeout, std::max(0.0, last_flush + opt.event_interval_s - now));
    bool no_pidfd = false;
    fds.clear();
    owners.clear();
    fds.push_back({wake[0], POLLIN, 0});
    fds.push_back({hooks.wake_fd, POLLIN, 0});
    fds.push_back({launcher->fd(), POLLIN, 0});
    fds.push_back({supervisor->pidfd(), POLLIN, 0});  // -1 (ignored by poll) without pidfds
    for (auto it = running.begin(); it != running.end(); ++it) {
      if (it->launching) continue;  // no pid yet: the launcher's eventfd wakes us
      if (it->deadline > 0 && !it->timed_out) timeout = std::min(timeout, std::max(0.0, it->deadline - now));
      if (it->kill_at > 0) timeout = std::min(timeout, std::max(0.0, it->kill_at - now));
      if (it->child.pidfd >= 0) {
        fds.push_back({it->child.pidfd, POLLIN, 0});
        owners.push_back(it);
      } else {
        no_pidfd = true;
      }
      if (it->child.output_fd >= 0) {
        fds.push_back({it->child.output_fd, POLLIN, 0});
        owners.push_back(it);
      }
    }
    if (no_pidfd) timeout = std::min(timeout, 0.005);
    if (wants_input()) timeout = 0;  // more input to pull
    int ms = static_cast<int>(std::ceil(timeout * 1000));
    int n = ::poll(fds.data(), fds.size(), ms);
    if (n < 0 && errno != EINTR) throw std::runtime_error(fmt::format("poll: {}", std::strerror(errno)));
    now = mono();
    bool woke = n > 0 && ((fds[0].revents & POLLIN) || (fds[1].revents & POLLIN));
    if (n > 0 && (fds[0].revents & POLLIN)) {
      char buf[64];
      while (::read(wake[0], buf, sizeof buf) > 0) {
      }
    }
    if (hooks.check_interrupt && (woke || now - last_check >= 0.05)) {
      last_check = now;
      hooks.check_interrupt();
      handle_requests(mono());
    }
    // Note [No process outlives the dispatcher] in supervisor.cpp: a lost supervisor is replaced
    // before anything else happens (restart() throws when it cannot be: the run then fails, and
    // the kill sequence stops every task).
    if ((n > 0 && (fds[3].revents & POLLIN)) || (supervisor->pidfd() < 0 && supervisor->lost()))
      message(supervisor->restart());
    // output, then exits (before launches: Note [Re-runs after a crash] in completion.cpp), then
    // the launcher's results
    std::vector<std::list<Running>::iterator> exited;
    for (std::size_t i = 4; n > 0 && i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      auto it = owners[i - 4];
      if (fds[i].fd == it->child.output_fd) pump_output(*it, false);
      else if (fds[i].fd == it->child.pidfd) exited.push_back(it);
    }
    if (no_pidfd)
      for (auto it = running.begin(); it != running.end(); ++it)
        if (it->child.pidfd < 0 && !it->launching) exited.push_back(it);
    for (auto it : exited) {
      auto st = reap_group(it->child.pid);
      if (st) finish(it, *st);
    }
    if (n > 0 && (fds[2].revents & POLLIN)) collect_launches(false, true);
    // timeouts and the kill sequence
    for (auto& r : running) {
      if (r.deadline > 0 && !r.timed_out && now >= r.deadline) {
        r.timed_out = true;
        stop_task(r, now);
      }
      if (r.kill_at > 0 && now >= r.kill_at && r.child.pid > 0) {
        signal_group(r.child.pid, SIGKILL);
        r.kill_at = now + 1.0;  // again later if something in the group survives
      }
    }
    flush_events(false);
  }
}

Dispatcher::Dispatcher(DispatchOptions options, DispatchHooks hooks)
    : impl_(new Impl(std::move(options), std::move(hooks))) {}
Dispatcher::~Dispatcher() { delete impl_; }
RunTotals Dispatcher::run() { return impl_->run(); }
void Dispatcher::interrupt() {
  int n = ++impl_->interrupts;
  if (n == 1) drain();
  else cancel();
}
void Dispatcher::drain() {
  impl_->drain_req = true;
  impl_->poke();
}
void Dispatcher::cancel() {
  impl_->cancel_req = true;
  impl_->poke();
}
void Dispatcher::notify_input() {
  impl_->input_ready = true;
  impl_->poke();
}
void Dispatcher::close_input() {
  impl_->input_closed = true;
  notify_input();
}
void Dispatcher::cancel_task(std::int64_t seq) {
  {
    std::lock_guard<std::mutex> lk(impl_->cancel_mu);
    impl_->cancel_seqs.push_back(seq);
  }
  impl_->cancel_pending = true;
  impl_->poke();
}
Dispatcher::FreeSlots Dispatcher::free_slots() const {
  FreeSlots f;
  for (const auto& d : impl_->devs)
    if (!d.quarantined && d.running < impl_->opt.slots_per_device) {
      f.gpu_slots += impl_->opt.slots_per_device - d.running;
      ++f.gpu_devices;
    }
  for (bool b : impl_->cpu_busy) f.cpu_slots += b ? 0 : 1;
  return f;
}
const std::string& Dispatcher::run_id() const { return impl_->run_id; }
const std::string& Dispatcher::marker() const { return impl_->marker; }

}  // namespace gpufleet::dispatch
