#include "dispatch/pool.h"

#include <algorithm>
#include <string>

#include "common/error.h"
#include "device/discovery.h"

namespace gpufleet::dispatch {

std::vector<PoolDevice> make_pool(const std::vector<int>& ordinals) {
  Topology topo = discover();
  auto visible = topo.visible_devices();
  std::vector<PoolDevice> pool;
  for (std::size_t i = 0; i < ordinals.size(); ++i) {
    int o = ordinals[i];
    GF_CHECK_ARG(o >= 0 && o < static_cast<int>(visible.size()),
                 "device cuda:{} is not visible here: {} GPU{} visible (CUDA_VISIBLE_DEVICES={}, discovery: {})", o,
                 visible.size(), visible.size() == 1 ? " is" : "s are",
                 topo.cuda_visible_devices ? "'" + *topo.cuda_visible_devices + "'" : std::string("unset"), topo.source);
    GF_CHECK_ARG(std::count(ordinals.begin(), ordinals.begin() + i, o) == 0,
                 "device cuda:{} is listed twice in the device pool; use slots_per_device to run several tasks on one GPU", o);
    const DeviceInfo& g = visible[o];
    PoolDevice d;
    d.ordinal = o;
    d.physical_index = g.nvml_index;
    d.name = g.name;
    if (g.source == "simulated") {
      d.visible_id = std::to_string(g.nvml_index >= 0 ? g.nvml_index : o);
    } else if (g.uuid.empty() && g.mig_uuid.empty()) {
      // No identity known (CUDA runtime discovery without NVML): reuse the user's own entry.
      std::vector<std::string> entries;
      if (topo.cuda_visible_devices) {
        std::string cur;
        for (char c : *topo.cuda_visible_devices + ",") {
          if (c == ',') {
            entries.push_back(cur);
            cur.clear();
          } else if (c != ' ') {
            cur += c;
          }
        }
      }
      d.visible_id = o < static_cast<int>(entries.size()) ? entries[o] : std::to_string(o);
    } else
      d.visible_id = g.mig_uuid.empty() ? g.uuid : g.mig_uuid;
    pool.push_back(std::move(d));
  }
  return pool;
}

}  // namespace gpufleet::dispatch
