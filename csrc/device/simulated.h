#pragma once
/// A simulated GPU topology, so that selection, dispatch and the CLI run on machines without GPUs.
///
/// Set by the API (set_simulated_gpus) or by GPUFLEET_SIMULATED_GPUS, whose value is a count ("4":
/// four idle 80 GiB GPUs) or a JSON list of objects with the optional keys `name`, `total_memory`,
/// `free_memory` (bytes or strings like "40GiB"), `utilization` (0-100), `processes` (a count, or a
/// list of {"pid": ..., "used_memory": ...}), `compute_capability` ("9.0") and `uuid`.
/// The API setting wins over the variable; neither touches real discovery when unset.
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "device/discovery.h"

namespace gpufleet {

/// Parses a simulated-topology spec (a count or a JSON list). Throws std::invalid_argument naming
/// the bad value and the accepted forms.
std::vector<DeviceInfo> parse_simulated_gpus(std::string_view spec);

/// Installs a simulated topology for this process (overrides GPUFLEET_SIMULATED_GPUS).
void set_simulated_gpus(std::vector<DeviceInfo> gpus);
/// Removes the API override; GPUFLEET_SIMULATED_GPUS applies again if set.
void clear_simulated_gpus();

/// Changes the live state of simulated GPU `index` (nvml order); unset fields stay as they are.
/// Throws std::out_of_range for an unknown index and std::logic_error when nothing is simulated.
void update_simulated_gpu(int index, std::optional<std::uint64_t> free_memory,
                          std::optional<int> utilization,
                          std::optional<std::vector<GpuProcess>> processes);

/// The simulated GPUs in effect (API, else environment), or nullopt when none.
std::optional<std::vector<DeviceInfo>> simulated_gpus();

/// Where the simulation comes from: "api", "env" or "" (none).
std::string simulation_origin();

}  // namespace gpufleet
