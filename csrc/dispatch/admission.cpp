// Input and admission: pulling tasks, the resume / skip checks, memory-aware admission and the
// placement of tasks on slots (Note [Work-conserving queue with affinity]).
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>

#include <fmt/format.h>

#include "common/units.h"
#include "device/discovery.h"
#include "dispatch/scheduler_impl.h"

namespace gpufleet::dispatch {

// ---- input -------------------------------------------------------------------------------------

void Dispatcher::Impl::pull_more() {
  std::size_t want = opt.lookahead - queue.size();
  if (!hooks.pull) {
    source_done = true;
    return;
  }
  std::vector<TaskSpec> got = hooks.pull(want);
  if (got.empty()) {
    // Note [Open input]: input_closed is read after the pull, so a close_input() that raced with it
    // leaves input_ready set and the next iteration asks once more.
    if (opt.keep_open && !input_closed.load()) input_idle = true;
    else source_done = true;
    return;
  }
  for (auto& t : got) accept(std::move(t));
}

void Dispatcher::Impl::accept(TaskSpec t) {
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
  for (const auto& o : t.outputs) {
    std::int64_t other = claim_output(o.final_path, t.seq);
    if (other >= 0) {
      finish_unstarted(t, TaskStatus::Failed,
                       fmt::format("its output '{}' is also the output of task {}: two tasks would write one file "
                                   "(make the output name unique per task, e.g. with {{#}} or {{//}})",
                                   o.final_path, other + 1));
      return;
    }
  }
  auto outputs_exist = [&] {
    for (const auto& o : t.outputs)
      if (!file_exists(o.final_path)) return false;
    return true;
  };
  if (opt.resume && journal) {
    if (auto e = journal->lookup(t.key)) {
      if (e->state == "succeeded" && outputs_exist()) {
        finish_unstarted(t, TaskStatus::Skipped, "succeeded in an earlier run (journal) and its outputs exist");
        return;
      }
      if (e->state == "running" && outputs_renamed_since(t, e->start)) {
        finish_unstarted(t, TaskStatus::Skipped,
                         "succeeded in an interrupted run: its outputs were renamed into place after its last attempt "
                         "started, before the journal recorded its end (Note [Re-runs after a crash])");
        return;
      }
    }
  }
  if (opt.skip_existing && !t.outputs.empty() && outputs_exist()) {
    finish_unstarted(t, TaskStatus::Skipped, "its outputs exist");
    return;
  }
  if (t.first_attempt < 1) {
    finish_unstarted(t, TaskStatus::Failed, fmt::format("first_attempt must be >= 1, got {}", t.first_attempt));
    return;
  }
  Pending p;
  p.attempt = t.first_attempt;
  p.spec = std::move(t);
  queue.push_back(std::move(p));
}

// Note [Output collisions]: two tasks of a run must not write one file (`--output 'out/{/.}.txt'` for
// a/x.txt and b/x.txt): the later one would replace the earlier one's result, and both wrote the same
// temporary file at once (a mix of both inputs reached the final name). Three checks:
// - run() and product() in Python look at every output of a finite task list before anything starts
//   and refuse the run (the CLI does the same for `:::` inputs);
// - here, every task claims its outputs when it is pulled (lazy input: before it can start), by
//   canonical path (symlinked directories, "..", "." resolved as far as the path exists); the later
//   task fails with a message naming the earlier one. The claims are 128-bit hashes (no path copies:
//   a run of millions of tasks keeps 16 bytes a claim) and last for the run;
// - at rename time (completion.cpp) a final name that already holds a file this run produced (same
//   device and inode) fails the task instead of replacing that file: spellings the canonical path
//   cannot see (a symlink created during the run, a hard-linked directory tree) are still caught.
namespace {
PathKey path_key(const std::string& final_path) {
  std::error_code ec;
  std::string canon = std::filesystem::weakly_canonical(final_path, ec).string();
  if (ec) canon = std::filesystem::path(final_path).lexically_normal().string();
  std::uint64_t fnv = 1469598103934665603ULL;
  for (unsigned char c : canon) fnv = (fnv ^ c) * 1099511628211ULL;
  return PathKey{std::hash<std::string>{}(canon), fnv};
}
}  // namespace

std::int64_t Dispatcher::Impl::claim_output(const std::string& final_path, std::int64_t seq) {
  auto [it, inserted] = output_claims.emplace(path_key(final_path), seq);
  return inserted || it->second == seq ? -1 : it->second;
}

// Note [Open input]: only an open run lets claims go (a run's claims otherwise last the run).
void Dispatcher::Impl::release_outputs(const TaskSpec& t) {
  if (!opt.keep_open) return;
  for (const auto& o : t.outputs) {
    auto it = output_claims.find(path_key(o.final_path));
    if (it != output_claims.end() && it->second == t.seq) output_claims.erase(it);
  }
}

// Whether every declared output of `t` exists and was last written after `start` (Unix seconds):
// only the rename of a successful attempt puts a file there (the temporary name is removed before
// each attempt starts), so such a file is that attempt's finished output. File times come from the
// kernel's coarse clock, up to a tick behind the one that read `start`: 50 ms of slack.
bool Dispatcher::Impl::outputs_renamed_since(const TaskSpec& t, double start) {
  if (t.outputs.empty()) return false;
  for (const auto& o : t.outputs) {
    struct stat st;
    if (::stat(o.final_path.c_str(), &st) != 0) return false;
    const double mtime = static_cast<double>(st.st_mtim.tv_sec) + st.st_mtim.tv_nsec * 1e-9;
    if (mtime < start - 0.05) return false;
  }
  return true;
}

// ---- memory ------------------------------------------------------------------------------------

std::vector<MemoryReading> Dispatcher::Impl::read_memory() {
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

void Dispatcher::Impl::refresh_memory(double now) {
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
bool Dispatcher::Impl::memory_fits(int d, std::uint64_t need) {
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

bool Dispatcher::Impl::can_ever_fit(std::uint64_t need) {
  if (need == 0) return true;
  for (std::size_t d = 0; d < devs.size(); ++d) {
    if (devs[d].quarantined) continue;
    if (!devs[d].mem.total || *devs[d].mem.total >= need) return true;
  }
  return false;
}

// ---- scheduling --------------------------------------------------------------------------------

int Dispatcher::Impl::free_slot(int d) const {
  const auto& b = devs[d].busy;
  for (std::size_t i = 0; i < b.size(); ++i)
    if (!b[i]) return static_cast<int>(i);
  return -1;
}

bool Dispatcher::Impl::any_free_slot() const {
  for (std::size_t d = 0; d < devs.size(); ++d)
    if (!devs[d].quarantined && devs[d].running < opt.slots_per_device) return true;
  for (bool b : cpu_busy)
    if (!b) return true;
  return false;
}

// Picks devices for `p` now, or returns false. See Note [Work-conserving queue with affinity].
bool Dispatcher::Impl::pick(const Pending& p, std::vector<int>& chosen) {
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
void Dispatcher::Impl::schedule(double now) {
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
        if (!healthy && opt.keep_open) {  // Note [Open input]: wait, do not burn the queue
          if (!quarantine_wait_warned)
            message("every GPU of the pool is quarantined: GPU tasks wait until the dispatcher is restarted");
          quarantine_wait_warned = true;
          ++it;
          continue;
        }
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

}  // namespace gpufleet::dispatch
