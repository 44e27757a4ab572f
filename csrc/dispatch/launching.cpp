// Launching: a task's environment and declared outputs, its submission to the launcher threads
// (Note [Launcher threads] in process.h), the results in submission order, its output pipe.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "dispatch/scheduler_impl.h"

namespace gpufleet::dispatch {

namespace {
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
}  // namespace

void Dispatcher::Impl::start(Pending& p, const std::vector<int>& ds, const std::vector<int>& slots) {
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
    // GNU parallel's {#}: the task number users see in the summary and the progress (1-based).
    ls.log_path = (std::filesystem::path(run_log_dir) / fmt::format("task-{}.attempt-{}.log", t.seq + 1, r.attempt)).string();
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
  // The task's number as every view shows it: {#}, the log file's, the summary's and the joblog's
  // (1-based, GNU parallel's $PARALLEL_SEQ); seq is the 0-based position in the input.
  ls.env.push_back(fmt::format("GPUFLEET_TASK_ID={}", t.seq + 1));
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
void Dispatcher::Impl::collect_launches(bool wait, bool results) {
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

void Dispatcher::Impl::complete_start(std::list<Running>::iterator it) {
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

void Dispatcher::Impl::pump_output(Running& r, bool final) {
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

}  // namespace gpufleet::dispatch
