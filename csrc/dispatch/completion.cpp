// Completion: a task's exit status, its atomic outputs (Note [Atomic outputs] in launching.cpp),
// retries with backoff on another device, quarantine, and the kill sequence.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "dispatch/scheduler_impl.h"

namespace gpufleet::dispatch {

// Note [Re-runs after a crash]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A task's success is known to the journal only once finish() commits it. A dispatcher SIGKILLed
// between the moment a task's process exits and that commit leaves the task recorded as "running",
// and resume runs it again although its command had completed. An external command gives no earlier
// sign of success, so the window cannot be closed for every task; it is kept as short as the design
// allows and closed for tasks that declare outputs:
// - the loop handles exits right after poll() returns, before the launcher's results and the
//   events (which take the GIL), and finish() commits before anything else is done for the run
//   (the kill of a finished group's leftovers and the reaping come before it, both microseconds);
// - with declared outputs, the rename to the final name comes before the commit, and resume treats
//   a task recorded "running" whose outputs all exist with a modification time after its last
//   attempt started as succeeded (admission.cpp): only that attempt's successful end can have put
//   them there (Note [Atomic outputs]). Its window is then the exit-to-rename interval alone;
// - the journal commits without fsync (journal.cpp): a commit survives the process, not the OS.
// What remains (commands without declared outputs, or a kill between exit and rename) may run again:
// tasks must be idempotent or declare outputs. benchmarks/chaos_bench.py measures the window
// (exit-to-commit latency) and counts the re-runs under a kill storm; README.md gives the figures.
void Dispatcher::Impl::finish(std::list<Running>::iterator it, ExitStatus st, std::string why) {
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
    if (status == TaskStatus::Succeeded && !opt.keep_open)  // Note [Output collisions]: the last check
      for (const auto& o : r.spec.outputs) {
        struct stat st;
        if (::stat(o.final_path.c_str(), &st) == 0 && produced.count({st.st_dev, st.st_ino})) {
          status = TaskStatus::Failed;
          why = fmt::format("its output '{}' is a file another task of this run wrote (the same file under another "
                            "name): two tasks would write one file; it was left as it was",
                            o.final_path);
          break;
        }
      }
    if (status == TaskStatus::Succeeded)
      for (const auto& o : r.spec.outputs) {
        if (::rename(o.temp_path.c_str(), o.final_path.c_str()) != 0) {
          status = TaskStatus::Failed;
          why = fmt::format("cannot rename '{}' to '{}': {}", o.temp_path, o.final_path, std::strerror(errno));
          break;
        }
        struct stat st;
        if (!opt.keep_open && ::stat(o.final_path.c_str(), &st) == 0) produced.insert({st.st_dev, st.st_ino});
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
                     r.attempt - r.spec.first_attempt < r.spec.retries && !stopping();
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
    release_outputs(r.spec);
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

void Dispatcher::Impl::stop_task(Running& r, double now) {
  if (r.child.pid <= 0) return;
  signal_group(r.child.pid, SIGTERM);
  if (r.kill_at == 0) r.kill_at = now + opt.kill_grace_s;
}

}  // namespace gpufleet::dispatch
