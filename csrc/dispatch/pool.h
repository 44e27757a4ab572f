#pragma once
/// Building the dispatcher's device pool from CUDA ordinals of this process.
#include <vector>

#include "dispatch/task.h"

namespace gpufleet::dispatch {

/// The pool for these visible CUDA ordinals (discovery: NVML or the simulated topology). A task's
/// CUDA_VISIBLE_DEVICES names a real GPU by UUID (its MIG UUID for a MIG instance) and a simulated
/// one by its physical index, so it never sees a GPU the dispatcher could not see.
/// Throws std::invalid_argument for an ordinal that is not visible, or a repeated one.
std::vector<PoolDevice> make_pool(const std::vector<int>& ordinals);

}  // namespace gpufleet::dispatch
