#pragma once
/// GPU discovery: NVML (loaded with dlopen, no CUDA context), the CUDA runtime as a fallback, or a
/// simulated topology. Fields a source cannot tell are left empty (std::nullopt), never invented.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "device/device.h"

namespace gpufleet {

/// A process holding memory on a GPU, as NVML reports it.
struct GpuProcess {
  std::uint32_t pid = 0;
  std::optional<std::uint64_t> used_memory;  ///< bytes; unknown under some drivers/containers
};

/// One physical GPU and, when visible in this process, its CUDA ordinal.
struct DeviceInfo {
  int ordinal = -1;     ///< CUDA ordinal in this process; -1 when hidden by CUDA_VISIBLE_DEVICES
  int nvml_index = -1;  ///< physical index as nvidia-smi numbers it (PCI bus order); -1 if unknown
  std::string name;
  std::string uuid;        ///< "GPU-..."; empty if unknown
  std::string pci_bus_id;  ///< "00000000:17:00.0" (NVML's form); empty if unknown
  std::string mig_uuid;    ///< set when CUDA_VISIBLE_DEVICES selected a MIG instance
  std::optional<std::pair<int, int>> compute_capability;
  std::optional<std::uint64_t> total_memory;
  std::optional<std::uint64_t> free_memory;
  std::optional<std::uint64_t> used_memory;
  std::optional<int> utilization;                     ///< % of the last sample period a kernel ran
  std::optional<std::vector<GpuProcess>> processes;  ///< compute processes
  std::string source;                                 ///< "nvml", "cuda" or "simulated"

  /// Names of the fields this source could not tell.
  std::vector<std::string> unknown_fields() const;
  /// `cuda:<ordinal>`; throws if the device is not visible.
  Device device() const;
};

/// Everything discovery found: all physical GPUs plus the visible ones in CUDA ordinal order.
struct Topology {
  std::string source = "none";            ///< "nvml", "cuda", "simulated" or "none"
  std::vector<DeviceInfo> gpus;           ///< every physical GPU (nvml order when known)
  std::vector<int> visible;               ///< indices into `gpus`, in CUDA ordinal order
  std::optional<std::string> cuda_visible_devices;  ///< the raw variable (nullopt: unset)
  std::string device_order = "FASTEST_FIRST";       ///< CUDA_DEVICE_ORDER in effect
  bool ordinal_order_exact = true;  ///< false when FASTEST_FIRST had to be approximated
  std::string driver_version;       ///< empty if unknown
  std::optional<int> cuda_driver_version;  ///< e.g. 12040
  std::vector<std::string> notes;   ///< why a source was unavailable, approximations made

  /// The visible devices, in ordinal order.
  std::vector<DeviceInfo> visible_devices() const;
};

/// Discovers the GPUs now. Simulation (API or GPUFLEET_SIMULATED_GPUS) takes precedence; then NVML;
/// then the CUDA runtime when CUDA is compiled in. Never throws for a missing driver or library.
Topology discover();

/// The visible GPUs (CUDA ordinal order).
std::vector<DeviceInfo> devices();

/// Number of visible GPUs; 0 on a machine without any (never throws).
int device_count();

/// Parses a PCI bus id ("00000000:17:00.0" or "0000:17:00.0") to a comparable integer; -1 if malformed.
std::int64_t pci_bus_key(const std::string& bus_id);

/// Build facts: CUDA compiled in, its architectures and runtime version.
struct BuildInfo {
  bool cuda = false;
  std::string cuda_architectures;
  std::optional<int> cuda_runtime_version;  ///< compiled-in runtime, e.g. 13000
};
BuildInfo build_info();

namespace detail {
/// Orders GPUs as the CUDA runtime would under `order` ("PCI_BUS_ID" or "FASTEST_FIRST") and
/// returns indices into `gpus`; `exact` tells whether FASTEST_FIRST could be decided exactly.
std::vector<int> cuda_enumeration_order(const std::vector<DeviceInfo>& gpus, const std::string& order,
                                        bool* exact);
/// Fills `ordinal`s and `visible` from CUDA_DEVICE_ORDER and CUDA_VISIBLE_DEVICES.
void apply_visibility(Topology& topo);
/// CUDA runtime fallback (defined in discovery_cuda.cpp when CUDA is compiled in).
bool discover_with_cuda_runtime(Topology& topo);
std::optional<int> cuda_runtime_version();
}  // namespace detail

}  // namespace gpufleet
