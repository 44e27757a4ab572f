// Input and admission: pulling tasks, the resume / skip checks, memory-aware admission and the
// placement of tasks on slots (Note [Work-conserving queue with affinity]).
#include <algorithm>

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
    source_done = true;
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
