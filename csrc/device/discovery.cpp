#include "device/discovery.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "common/error.h"
#include "device/nvml.h"
#include "device/simulated.h"
#include "device/visible_devices.h"

namespace gpufleet {

std::vector<std::string> DeviceInfo::unknown_fields() const {
  std::vector<std::string> out;
  if (nvml_index < 0) out.emplace_back("nvml_index");
  if (name.empty()) out.emplace_back("name");
  if (uuid.empty()) out.emplace_back("uuid");
  if (pci_bus_id.empty()) out.emplace_back("pci_bus_id");
  if (!compute_capability) out.emplace_back("compute_capability");
  if (!total_memory) out.emplace_back("total_memory");
  if (!free_memory) out.emplace_back("free_memory");
  if (!used_memory) out.emplace_back("used_memory");
  if (!utilization) out.emplace_back("utilization");
  if (!processes) out.emplace_back("processes");
  return out;
}

Device DeviceInfo::device() const {
  GF_CHECK_ARG(ordinal >= 0, "GPU {} ({}) is not visible in this process (CUDA_VISIBLE_DEVICES)",
               nvml_index, uuid);
  return Device::cuda(ordinal);
}

std::vector<DeviceInfo> Topology::visible_devices() const {
  std::vector<DeviceInfo> out;
  out.reserve(visible.size());
  for (int i : visible) out.push_back(gpus[i]);
  return out;
}

std::int64_t pci_bus_key(const std::string& bus_id) {
  // domain:bus:device.function, all hex; NVML pads the domain to 8 digits, CUDA to 4.
  unsigned long long domain = 0, bus = 0, dev = 0, fn = 0;
  if (std::sscanf(bus_id.c_str(), "%llx:%llx:%llx.%llx", &domain, &bus, &dev, &fn) != 4) return -1;
  return static_cast<std::int64_t>((domain << 24) | (bus << 16) | (dev << 8) | fn);
}

namespace detail {

std::vector<int> cuda_enumeration_order(const std::vector<DeviceInfo>& gpus, const std::string& order,
                                        bool* exact) {
  std::vector<int> idx(gpus.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto by_pci = [&](int a, int b) {
    const auto ka = pci_bus_key(gpus[a].pci_bus_id), kb = pci_bus_key(gpus[b].pci_bus_id);
    if (ka != kb) return ka < kb;
    return a < b;
  };
  std::stable_sort(idx.begin(), idx.end(), by_pci);
  *exact = true;
  if (order == "PCI_BUS_ID") return idx;
  // Note [FASTEST_FIRST]: CUDA's default order puts the fastest device first using a private
  // heuristic; among identical devices it is PCI bus order. Without creating a CUDA context we can
  // only approximate it for mixed machines: newer compute capability first, then PCI bus order.
  bool homogeneous = std::all_of(gpus.begin(), gpus.end(), [&](const DeviceInfo& d) {
    return d.name == gpus.front().name && d.compute_capability == gpus.front().compute_capability;
  });
  if (homogeneous) return idx;
  *exact = false;
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
    return gpus[a].compute_capability.value_or(std::pair{0, 0}) >
           gpus[b].compute_capability.value_or(std::pair{0, 0});
  });
  return idx;
}

void apply_visibility(Topology& topo) {
  const char* order_env = std::getenv("CUDA_DEVICE_ORDER");
  topo.device_order = (order_env && std::string(order_env) == "PCI_BUS_ID") ? "PCI_BUS_ID" : "FASTEST_FIRST";
  if (order_env && *order_env && topo.device_order != order_env) {
    topo.notes.push_back(fmt::format("CUDA_DEVICE_ORDER='{}' is not PCI_BUS_ID or FASTEST_FIRST; "
                                     "CUDA treats it as FASTEST_FIRST",
                                     order_env));
  }
  topo.cuda_visible_devices = visible_devices_env();
  bool exact = true;
  const std::vector<int> order = cuda_enumeration_order(topo.gpus, topo.device_order, &exact);
  topo.ordinal_order_exact = exact;
  if (!exact) {
    topo.notes.push_back("CUDA_DEVICE_ORDER=FASTEST_FIRST on a mixed machine: ordinals approximated "
                         "(newest compute capability first); set CUDA_DEVICE_ORDER=PCI_BUS_ID for exact ordinals");
  }
  std::vector<GpuIdentity> ids;
  for (int i : order) ids.push_back({topo.gpus[i].uuid, {}});
  const auto visible = parse_visible_devices(topo.cuda_visible_devices, ids);
  for (auto& g : topo.gpus) g.ordinal = -1;
  topo.visible.clear();
  for (std::size_t ord = 0; ord < visible.size(); ++ord) {
    const int gpu = order[visible[ord].gpu];
    topo.gpus[gpu].ordinal = static_cast<int>(ord);
    topo.gpus[gpu].mig_uuid = visible[ord].mig_uuid;
    topo.visible.push_back(gpu);
  }
}

#if !GPUFLEET_WITH_CUDA
bool discover_with_cuda_runtime(Topology& topo) {
  topo.notes.push_back("CUDA runtime fallback unavailable: gpufleet was built without CUDA");
  return false;
}
std::optional<int> cuda_runtime_version() { return std::nullopt; }
#endif

}  // namespace detail

Topology discover() {
  Topology topo;
  if (auto sim = simulated_gpus()) {
    topo.source = "simulated";
    topo.gpus = std::move(*sim);
    topo.notes.push_back(fmt::format("simulated topology in effect ({}): these GPUs are not real",
                                     simulation_origin() == "api" ? "set through the API"
                                                                  : "GPUFLEET_SIMULATED_GPUS"));
    detail::apply_visibility(topo);
    return topo;
  }
  if (nvml::discover(topo)) {
    detail::apply_visibility(topo);
    return topo;
  }
  if (detail::discover_with_cuda_runtime(topo)) return topo;  // the runtime already applied visibility
  topo.source = "none";
  return topo;
}

std::vector<DeviceInfo> devices() { return discover().visible_devices(); }

int device_count() { return static_cast<int>(discover().visible.size()); }

BuildInfo build_info() {
  BuildInfo b;
  b.cuda = GPUFLEET_WITH_CUDA;
  b.cuda_architectures = GPUFLEET_CUDA_ARCHITECTURES;
  b.cuda_runtime_version = detail::cuda_runtime_version();
  return b;
}

}  // namespace gpufleet
