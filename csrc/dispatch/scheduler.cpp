// The dispatcher's run loop. One thread: poll() on pidfds (task exits), output pipes, a wake pipe,
// the launcher's eventfd and the interrupt fd; the Python layer is only entered through the hooks
// (pull tasks, events, interrupt checks), each of which takes the GIL briefly. The posix_spawn calls
// themselves run on a few launcher threads (Note [Launcher threads] in process.h); everything else,
// the run's state included, stays on this thread.
#include "dispatch/scheduler.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <list>
#include <memory>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>

#include "common/error.h"
#include "common/units.h"
#include "device/discovery.h"
#include "dispatch/journal.h"
#include "dispatch/supervisor.h"

namespace gpufleet::dispatch {

const char* status_name(TaskStatus s) {
  switch (s) {
    case TaskStatus::Succeeded: return "succeeded";
    case TaskStatus::Failed: return "failed";
    case TaskStatus::TimedOut: return "timed_out";
    case TaskStatus::Cancelled: return "cancelled";
    case TaskStatus::Skipped: return "skipped";
    case TaskStatus::NotStarted: return "not_started";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;

double mono() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }
double epoch() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void write_all(int fd, const std::string& s) {
  const char* p = s.data();
  std::size_t left = s.size();
  while (left) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    left -= static_cast<std::size_t>(w);
  }
}

// GNU parallel's {%} (the job slot, 1-based) is known only when a task starts: the Python layer leaves this
// mark in the argv words that use it (Note [Job slot placeholder] in python/gpufleet/_dispatch_template.py).
const std::string kJobSlotMark("\0gfslot\0", 8);

void replace_job_slot(std::vector<std::string>& argv, int job_slot) {
  for (auto& a : argv)
    for (std::size_t p; (p = a.find(kJobSlotMark)) != std::string::npos;)
      a.replace(p, kJobSlotMark.size(), std::to_string(job_slot));
}

const std::vector<std::string> kReservedVars = {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_TASK_ID",
                                                "GPUFLEET_TASK_NAME",   "GPUFLEET_DEVICE",   "GPUFLEET_SLOT",
                                                "GPUFLEET_ATTEMPT",     "GPUFLEET_RUN_ID"};

struct Pending {
  TaskSpec spec;
  int attempt = 1;
  double not_before = 0;
  int avoid = -1;
};

struct Running {
  TaskSpec spec;
  int attempt = 1;
  std::vector<int> devices;  // pool positions
  std::vector<int> slots;    // slot per device (or the CPU slot)
  Child child;
  // Launching: submitted to the launcher, no pid yet (its Started event waits in `started`).
  bool launching = false, launch_done = false;
  std::uint64_t launch_id = 0;
  std::string launch_error;
  TaskEvent started;
  double start_mono = 0, start_epoch = 0;
  double deadline = 0, kill_at = 0;
  bool timed_out = false, cancelled = false;
  std::string log_path, partial;
};

struct DevState {
  std::vector<bool> busy;
  int running = 0;
  int consecutive_failures = 0;
  bool quarantined = false;
  std::uint64_t reserved_all = 0, reserved_since = 0;
  MemoryReading mem;
};

}  // namespace

struct Dispatcher::Impl {
  DispatchOptions opt;
  DispatchHooks hooks;
  std::string token, run_id, marker;
  std::vector<std::string> base_env;
  std::unique_ptr<Journal> journal;
  std::unique_ptr<Supervisor> supervisor;
  std::list<Pending> queue;
  std::list<Running> running;
  std::unique_ptr<Launcher> launcher;
  std::deque<std::list<Running>::iterator> launching;  // submission order
  std::uint64_t next_launch_id = 1;
  std::vector<DevState> devs;
  std::vector<bool> cpu_busy;
  std::vector<TaskEvent> events;
  RunTotals totals;
  bool source_done = false;
  double last_mem_read = -1e30, last_flush = 0, last_check = 0;
  bool memory_unknown_warned = false;
  std::atomic<int> interrupts{0};
  std::atomic<bool> drain_req{false}, cancel_req{false};
  bool drain_seen = false, cancel_seen = false;
  int wake[2] = {-1, -1};

  Impl(DispatchOptions o, DispatchHooks h) : opt(std::move(o)), hooks(std::move(h)) {
    GF_CHECK_ARG(opt.slots_per_device >= 1, "slots_per_device must be at least 1, got {}", opt.slots_per_device);
    GF_CHECK_ARG(opt.kill_grace_s >= 0, "kill_grace must be >= 0 seconds, got {}", opt.kill_grace_s);
    GF_CHECK_ARG(opt.output != OutputMode::File || !opt.log_dir.empty(), "log files need a log directory");
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) throw std::runtime_error("pipe2 failed");
    token = random_token();
    run_id = token.substr(0, 12);
    marker = "GPUFLEET_RUN_ID=" + token;
  }
  ~Impl() {
    ::close(wake[0]);
    ::close(wake[1]);
  }

  bool stopping() const { return drain_seen || cancel_seen; }
  std::size_t total_slots() const { return devs.size() * opt.slots_per_device + cpu_busy.size(); }

  void poke() {
    char c = 1;
    [[maybe_unused]] ssize_t w = ::write(wake[1], &c, 1);
  }

  void message(const std::string& text) {
    TaskEvent e;
    e.kind = EventKind::Message;
    e.message = text;
    e.start = e.end = epoch();
    events.push_back(std::move(e));
  }

  std::string device_names(const std::vector<int>& ds) const {
    if (ds.empty()) return "cpu";
    std::string s;
    for (int d : ds) {
      if (!s.empty()) s += ",";
      s += fmt::format("cuda:{}", opt.devices[d].ordinal);
    }
    return s;
  }

  void flush_events(bool force) {
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

  void finish_unstarted(const TaskSpec& t, TaskStatus status, const std::string& why) {
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
    events.push_back(std::move(e));
  }

  // ---- input -------------------------------------------------------------------------------
  void pull_more() {
    std::size_t want = opt.lookahead - queue.size();
    if (!hooks.pull) {
      source_done = true;
      return;
    }
    std::vector<TaskSpec> got = hooks.pull(want);
    if (got.empty()) {
      source_done = true;
      return;
    }
    for (auto& t : got) accept(std::move(t));
  }

  void accept(TaskSpec t) {
    if (t.gpus < 0) {
      finish_unstarted(t, TaskStatus::Failed, fmt::format("gpus must be >= 0, got {}", t.gpus));
      return;
    }
    if (t.gpus > static_cast<int>(devs.size())) {
      finish_unstarted(t, TaskStatus::Failed,
                       fmt::format("needs {} GPU{} but the device pool has {}", t.gpus, t.gpus == 1 ? "" : "s",
                                   devs.size()));
      return;
    }
    auto outputs_exist = [&] {
      for (const auto& o : t.outputs)
        if (!file_exists(o.final_path)) return false;
      return true;
    };
    if (opt.resume && journal && journal->succeeded(t.key) && outputs_exist()) {
      finish_unstarted(t, TaskStatus::Skipped, "succeeded in an earlier run (journal) and its outputs exist");
      return;
    }
    if (opt.skip_existing && !t.outputs.empty() && outputs_exist()) {
      finish_unstarted(t, TaskStatus::Skipped, "its outputs exist");
      return;
    }
    Pending p;
    p.spec = std::move(t);
    queue.push_back(std::move(p));
  }

  // ---- memory ------------------------------------------------------------------------------
  std::vector<MemoryReading> read_memory() {
    if (hooks.memory) return hooks.memory();
    std::vector<MemoryReading> out(opt.devices.size());
    Topology topo = discover();
    for (std::size_t i = 0; i < opt.devices.size(); ++i) {
      for (const auto& g : topo.gpus)
        if (g.nvml_index == opt.devices[i].physical_index && g.nvml_index >= 0) {
          out[i].free = g.free_memory;
          out[i].total = g.total_memory;
        }
    }
    return out;
  }

  void refresh_memory(double now) {
    if (now - last_mem_read < opt.memory_poll_s) return;
    last_mem_read = now;
    auto r = read_memory();
    for (std::size_t i = 0; i < devs.size() && i < r.size(); ++i) {
      devs[i].mem = r[i];
      devs[i].reserved_since = 0;
    }
  }

  // Note [Memory-aware admission]: a task needing M bytes starts on a device when the last reading
  // of its free memory, minus what tasks started since that reading declared, is at least M, and
  // (when the total is known) total minus what all running tasks there declared is at least M. The
  // first term respects other users of the GPU; the second keeps declared needs from over-packing
  // a device before the running tasks have allocated. On a simulated topology the free memory is
  // whatever the simulation says (update_simulated_gpu changes it): the tests drive it that way.
  bool memory_fits(int d, std::uint64_t need) {
    if (need == 0) return true;
    const DevState& s = devs[d];
    if (!s.mem.free) {
      if (!memory_unknown_warned) {
        memory_unknown_warned = true;
        message(fmt::format("free memory of cuda:{} is unknown (no NVML): min_free_memory is not enforced there",
                            opt.devices[d].ordinal));
      }
      return true;
    }
    if (*s.mem.free < s.reserved_since || *s.mem.free - s.reserved_since < need) return false;
    if (s.mem.total && (*s.mem.total < s.reserved_all || *s.mem.total - s.reserved_all < need)) return false;
    return true;
  }

  bool can_ever_fit(std::uint64_t need) {
    if (need == 0) return true;
    for (std::size_t d = 0; d < devs.size(); ++d) {
      if (devs[d].quarantined) continue;
      if (!devs[d].mem.total || *devs[d].mem.total >= need) return true;
    }
    return false;
  }

  // ---- scheduling --------------------------------------------------------------------------
  int free_slot(int d) const {
    const auto& b = devs[d].busy;
    for (std::size_t i = 0; i < b.size(); ++i)
      if (!b[i]) return static_cast<int>(i);
    return -1;
  }

  bool any_free_slot() const {
    for (std::size_t d = 0; d < devs.size(); ++d)
      if (!devs[d].quarantined && devs[d].running < opt.slots_per_device) return true;
    for (bool b : cpu_busy)
      if (!b) return true;
    return false;
  }

  // Picks devices for `p` now, or returns false. See Note [Work-conserving queue with affinity].
  bool pick(const Pending& p, std::vector<int>& chosen) {
    chosen.clear();
    const int need_gpus = p.spec.gpus;
    std::vector<int> cand;
    for (std::size_t d = 0; d < devs.size(); ++d) {
      const auto& s = devs[d];
      if (s.quarantined || s.running >= opt.slots_per_device) continue;
      if (!memory_fits(static_cast<int>(d), p.spec.min_free_memory)) continue;
      cand.push_back(static_cast<int>(d));
    }
    if (static_cast<int>(cand.size()) < need_gpus) return false;
    std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) {
      bool aa = a == p.avoid, ba = b == p.avoid;  // a retry prefers another device
      if (aa != ba) return !aa;
      return devs[a].running < devs[b].running;
    });
    if (p.spec.affinity >= 0) {
      auto it = std::find(cand.begin(), cand.end(), p.spec.affinity);
      if (it != cand.end()) std::rotate(cand.begin(), it, it + 1);
    }
    chosen.assign(cand.begin(), cand.begin() + need_gpus);
    return true;
  }

  // Note [Work-conserving queue with affinity]: all tasks wait in one queue (the lookahead window
  // of the input). A first pass places tasks whose affinity device has a free slot there; a second
  // pass gives every remaining free slot the oldest task that fits, whatever its affinity, so an
  // idle device steals instead of idling (the seed's hash assignment let one GPU idle while the
  // other had a backlog). A task that does not fit (memory, GPU count) does not block those behind.
  void schedule(double now) {
    if (!any_free_slot()) return;
    bool need_mem = false;
    for (const auto& p : queue)
      if (p.spec.min_free_memory > 0) need_mem = true;
    if (need_mem) refresh_memory(now);
    std::vector<int> chosen;
    for (int pass = 0; pass < 2 && any_free_slot(); ++pass) {
      for (auto it = queue.begin(); it != queue.end() && any_free_slot();) {
        Pending& p = *it;
        if (p.not_before > now || (pass == 0 && (p.spec.affinity < 0 || p.spec.gpus != 1))) {
          ++it;
          continue;
        }
        if (p.spec.gpus == 0) {
          auto f = std::find(cpu_busy.begin(), cpu_busy.end(), false);
          if (f == cpu_busy.end()) {
            ++it;
            continue;
          }
          int slot = static_cast<int>(f - cpu_busy.begin());
          start(p, {}, {slot});
          it = queue.erase(it);
          continue;
        }
        if (pass == 0) {
          int a = p.spec.affinity;
          if (a >= static_cast<int>(devs.size()) || devs[a].quarantined || devs[a].running >= opt.slots_per_device ||
              !memory_fits(a, p.spec.min_free_memory)) {
            ++it;
            continue;
          }
          chosen = {a};
        } else {
          bool healthy = false;
          for (const auto& d : devs)
            if (!d.quarantined) healthy = true;
          if (!healthy) {
            finish_unstarted(p.spec, TaskStatus::Failed, "every device of the pool is quarantined");
            it = queue.erase(it);
            continue;
          }
          if (p.spec.min_free_memory > 0 && !can_ever_fit(p.spec.min_free_memory)) {
            finish_unstarted(p.spec, TaskStatus::Failed,
                             fmt::format("needs {} free GPU memory but no device of the pool has that much in total",
                                         format_memory_size(p.spec.min_free_memory)));
            it = queue.erase(it);
            continue;
          }
          if (!pick(p, chosen)) {
            ++it;
            continue;
          }
        }
        std::vector<int> slots;
        for (int d : chosen) slots.push_back(free_slot(d));
        start(p, chosen, slots);
        it = queue.erase(it);
      }
    }
  }

  // ---- launching and finishing -------------------------------------------------------------
  void start(Pending& p, const std::vector<int>& ds, const std::vector<int>& slots) {
    Running r;
    r.spec = std::move(p.spec);
    r.attempt = p.attempt;
    r.devices = ds;
    r.slots = slots;
    const TaskSpec& t = r.spec;
    LaunchSpec ls;
    ls.argv = t.argv;
    replace_job_slot(ls.argv, 1 + (ds.empty() ? slots[0] : ds[0] * opt.slots_per_device + slots[0]));
    ls.cwd = t.cwd;
    ls.output = opt.output;
    if (opt.output == OutputMode::File) {
      // <log_dir>/<run_id>/task-<n>.attempt-<k>.log, n the 1-based number users see ({#}, the summary)
      ls.log_path = (std::filesystem::path(opt.log_dir) / run_id /
                     fmt::format("task-{}.attempt-{}.log", t.seq + 1, r.attempt)).string();
      r.log_path = ls.log_path;
    }
    ls.env.reserve(base_env.size() + t.env.size() + 8);
    for (const auto& e : base_env) {
      std::string_view name = std::string_view(e).substr(0, e.find('='));
      bool overridden = false;
      for (const auto& kv : t.env)
        if (kv.first == name) overridden = true;
      if (!overridden) ls.env.push_back(e);
    }
    for (const auto& kv : t.env)
      if (std::find(kReservedVars.begin(), kReservedVars.end(), kv.first) == kReservedVars.end())
        ls.env.push_back(kv.first + "=" + kv.second);
    std::string cvd, devname;
    for (int d : ds) {
      if (!cvd.empty()) cvd += ",";
      cvd += opt.devices[d].visible_id;
    }
    ls.env.push_back("CUDA_VISIBLE_DEVICES=" + cvd);
    ls.env.push_back("CUDA_DEVICE_ORDER=PCI_BUS_ID");
    ls.env.push_back(fmt::format("GPUFLEET_TASK_ID={}", t.seq));
    ls.env.push_back("GPUFLEET_TASK_NAME=" + t.name);
    ls.env.push_back("GPUFLEET_DEVICE=" + device_names(ds));
    ls.env.push_back(fmt::format("GPUFLEET_SLOT={}", slots.empty() ? 0 : slots[0]));
    ls.env.push_back(fmt::format("GPUFLEET_ATTEMPT={}", r.attempt));
    ls.env.push_back(marker);

    // Note [Atomic outputs]: a declared output is written under a temporary name in the same
    // directory (the Python layer exposes it as the {output} placeholder); on success it is renamed
    // into place (atomic on one file system), on any failure it is removed. A file at the final
    // name is therefore always complete, and skip_existing/resume can trust it.
    for (const auto& o : t.outputs) {
      std::error_code ec;
      auto parent = std::filesystem::path(o.temp_path).parent_path();
      if (!parent.empty()) std::filesystem::create_directories(parent, ec);
      ::unlink(o.temp_path.c_str());
    }
    for (int i = 0; i < static_cast<int>(ds.size()); ++i) {
      devs[ds[i]].busy[slots[i]] = true;
      devs[ds[i]].running++;
      devs[ds[i]].reserved_all += t.min_free_memory;
      devs[ds[i]].reserved_since += t.min_free_memory;
    }
    if (ds.empty()) cpu_busy[slots[0]] = true;
    r.start_mono = mono();
    r.start_epoch = epoch();
    TaskEvent e;
    e.kind = EventKind::Started;
    e.seq = t.seq;
    e.name = t.name;
    e.attempt = r.attempt;
    e.devices = ds;
    e.slot = slots.empty() ? 0 : slots[0];
    e.start = r.start_epoch;
    e.log_path = r.log_path;
    ++totals.attempts;
    r.started = std::move(e);
    r.launching = true;
    r.launch_id = next_launch_id++;
    int err = 0;
    ls.program = resolve_program(ls.argv[0], ls.cwd, err);  // here: the launcher threads read no environment
    running.push_back(std::move(r));
    auto it = std::prev(running.end());
    launching.push_back(it);
    if (err != 0) {
      it->launch_done = true;
      it->child.pid = -1;
      it->launch_error = fmt::format("cannot start '{}'{}: {}", ls.argv[0],
                                     ls.cwd.empty() ? "" : fmt::format(" in '{}'", ls.cwd), std::strerror(err));
    } else {
      launcher->submit(it->launch_id, std::move(ls));
    }
  }

  // Takes the launcher's results and completes the starts in submission order, so that Started
  // events (and journal rows) keep the order in which the queue started the tasks.
  void collect_launches(bool wait, bool results = true) {
    if (launching.empty()) return;
    if (wait) launcher->wait_idle();
    if (results || wait)
      for (auto& d : launcher->take())
        for (auto it : launching)
          if (it->launch_id == d.id) {
            it->launch_done = true;
            it->child = d.child;
            it->launch_error = std::move(d.error);
            break;
          }
    while (!launching.empty() && launching.front()->launch_done) {
      auto it = launching.front();
      launching.pop_front();
      complete_start(it);
    }
  }

  void complete_start(std::list<Running>::iterator it) {
    Running& r = *it;
    r.launching = false;
    TaskEvent& e = r.started;
    if (r.child.pid > 0) {
      if (r.spec.timeout_s > 0) r.deadline = r.start_mono + r.spec.timeout_s;
      e.pid = r.child.pid;
      if (journal) journal->record_start(r.spec, e, device_names(r.devices), run_id);
      events.push_back(e);
      if (r.cancelled) stop_task(r, mono());  // cancelled while it was being launched
    } else {
      e.message = r.launch_error;
      events.push_back(e);
      ExitStatus st;
      st.exit_code = 127;
      finish(it, st, e.message);
    }
  }

  void pump_output(Running& r, bool final) {
    if (r.child.output_fd < 0) return;
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(r.child.output_fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n > 0) {
        r.partial.append(buf, static_cast<std::size_t>(n));
        std::string out;
        std::size_t start = 0, nl;
        while ((nl = r.partial.find('\n', start)) != std::string::npos) {
          out += "[" + r.spec.name + "] ";
          out.append(r.partial, start, nl - start + 1);
          start = nl + 1;
        }
        r.partial.erase(0, start);
        if (!out.empty()) write_all(1, out);
        continue;
      }
      if (n == 0) {  // EOF: every writer is gone
        ::close(r.child.output_fd);
        r.child.output_fd = -1;
        final = true;
      }
      break;  // EAGAIN
    }
    if (final && !r.partial.empty()) {
      write_all(1, "[" + r.spec.name + "] " + r.partial + "\n");
      r.partial.clear();
    }
  }

  void finish(std::list<Running>::iterator it, ExitStatus st, std::string why = {}) {
    Running& r = *it;
    if (r.child.pid > 0) {  // reaped by reap_group, which also killed the leftovers of its group
      supervisor->untrack(r.child.pid);
      pump_output(r, true);
    }
    close_child(r.child);
    TaskStatus status;
    if (r.cancelled) status = TaskStatus::Cancelled;
    else if (r.timed_out) status = TaskStatus::TimedOut;
    else if (st.exit_code && *st.exit_code == 0) status = TaskStatus::Succeeded;
    else status = TaskStatus::Failed;
    if (status == TaskStatus::TimedOut) why = fmt::format("timed out after {:g} s", r.spec.timeout_s);
    if (status == TaskStatus::Cancelled) why = "cancelled";
    if (status == TaskStatus::Failed && why.empty()) {
      if (st.signal) why = fmt::format("killed by signal {} ({})", *st.signal, strsignal(*st.signal));
      else if (st.exit_code) why = fmt::format("exit status {}", *st.exit_code);
      else why = "exit status unknown";
    }
    if (status == TaskStatus::Succeeded) {
      for (const auto& o : r.spec.outputs)
        if (!file_exists(o.temp_path)) {
          status = TaskStatus::Failed;
          why = fmt::format("declared output '{}' was not written: the command must write it under its temporary "
                            "name '{}' (the {{output}} placeholder)",
                            o.final_path, o.temp_path);
          break;
        }
      if (status == TaskStatus::Succeeded)
        for (const auto& o : r.spec.outputs)
          if (::rename(o.temp_path.c_str(), o.final_path.c_str()) != 0) {
            status = TaskStatus::Failed;
            why = fmt::format("cannot rename '{}' to '{}': {}", o.temp_path, o.final_path, std::strerror(errno));
            break;
          }
    }
    if (status != TaskStatus::Succeeded)
      for (const auto& o : r.spec.outputs) ::unlink(o.temp_path.c_str());

    for (std::size_t i = 0; i < r.devices.size(); ++i) {
      DevState& s = devs[r.devices[i]];
      s.busy[r.slots[i]] = false;
      s.running--;
      s.reserved_all -= std::min(s.reserved_all, r.spec.min_free_memory);
      if (status == TaskStatus::Succeeded) s.consecutive_failures = 0;
      else if (status != TaskStatus::Cancelled) {
        ++s.consecutive_failures;
        if (opt.quarantine_after > 0 && !s.quarantined && s.consecutive_failures >= opt.quarantine_after) {
          s.quarantined = true;
          totals.quarantined.push_back(r.devices[i]);
          message(fmt::format("cuda:{} quarantined after {} consecutive failed tasks; its tasks go elsewhere",
                              opt.devices[r.devices[i]].ordinal, s.consecutive_failures));
        }
      }
    }
    if (r.devices.empty() && !r.slots.empty()) cpu_busy[r.slots[0]] = false;

    const bool retry = status != TaskStatus::Succeeded && status != TaskStatus::Cancelled &&
                       r.attempt <= r.spec.retries && !stopping();
    TaskEvent e;
    e.kind = EventKind::Finished;
    e.seq = r.spec.seq;
    e.name = r.spec.name;
    e.attempt = r.attempt;
    e.devices = r.devices;
    e.slot = r.slots.empty() ? 0 : r.slots[0];
    e.start = r.start_epoch;
    e.end = r.start_epoch + (mono() - r.start_mono);
    e.status = status;
    e.exit_code = st.exit_code;
    e.signal = st.signal;
    e.final = !retry;
    e.log_path = r.log_path;
    e.message = why;
    e.pid = r.child.pid;
    if (journal) journal->record_finish(r.spec, e, device_names(r.devices), run_id);
    events.push_back(e);
    if (!retry) {
      if (status == TaskStatus::Succeeded) ++totals.succeeded;
      else ++totals.failed;
    } else {
      Pending p;
      p.spec = std::move(r.spec);
      p.attempt = r.attempt + 1;
      p.not_before = mono() + opt.retry_backoff_s * std::pow(2.0, r.attempt - 1);
      p.avoid = r.devices.empty() ? -1 : r.devices[0];
      queue.push_front(std::move(p));
    }
    running.erase(it);
  }

  void stop_task(Running& r, double now) {
    if (r.child.pid <= 0) return;
    signal_group(r.child.pid, SIGTERM);
    if (r.kill_at == 0) r.kill_at = now + opt.kill_grace_s;
  }

  void handle_requests(double now) {
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

  // ---- the loop ----------------------------------------------------------------------------
  RunTotals run() {
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
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::path(opt.log_dir) / run_id, ec);
      if (ec) throw std::runtime_error(fmt::format("cannot create the log directory '{}': {}", opt.log_dir, ec.message()));
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
      if (journal) journal->end_run(run_id, "error");
      throw;
    }
    flush_events(true);
    launcher.reset();
    supervisor->close();
    if (journal) journal->end_run(run_id, totals.cancelled ? "cancelled" : totals.drained ? "drained" : "finished");
    return totals;
  }

  // On an exception: the kill sequence for every running task, synchronously.
  void abort_all() {
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
          try {
            finish(it, *st);
          } catch (...) {
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

  void loop() {
    std::vector<pollfd> fds;
    std::vector<std::list<Running>::iterator> owners;
    for (;;) {
      double now = mono();
      handle_requests(now);
      if (!stopping() && !source_done && queue.size() <= opt.lookahead / 2) pull_more();
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
      // timers
      double timeout = 0.05;
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
      if (!stopping() && !source_done && queue.size() <= opt.lookahead / 2) timeout = 0;  // more input to pull
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
      // output, then exits
      std::vector<std::list<Running>::iterator> exited;
      if (n > 0 && (fds[2].revents & POLLIN)) collect_launches(false, true);
      for (std::size_t i = 3; n > 0 && i < fds.size(); ++i) {
        if (!fds[i].revents) continue;
        auto it = owners[i - 3];
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
};

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
const std::string& Dispatcher::run_id() const { return impl_->run_id; }

}  // namespace gpufleet::dispatch
