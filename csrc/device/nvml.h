#pragma once
/// NVML loaded at run time with dlopen (no link-time dependency, no CUDA context).
/// Only the few entry points gpufleet uses are declared here, with their ABI structs.
#include <memory>
#include <string>

#include "device/discovery.h"

namespace gpufleet::nvml {

/// Loads NVML (GPUFLEET_NVML_LIBRARY, else libnvidia-ml.so.1) and reads every GPU into `topo`.
/// Returns false, with a note in `topo.notes`, when NVML is unavailable or fails to initialise.
/// GPUFLEET_DISABLE_NVML=1 skips NVML entirely.
bool discover(Topology& topo);

}  // namespace gpufleet::nvml
