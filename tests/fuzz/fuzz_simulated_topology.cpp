// Simulated topologies (GPUFLEET_SIMULATED_GPUS: a count or a JSON list): parse; the result is a
// consistent topology.
#include <stdexcept>

#include "device/simulated.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  try {
    auto gpus = gpufleet::parse_simulated_gpus(as_text(data, size));
    FUZZ_CHECK(gpus.size() <= 1024, "%zu GPUs", gpus.size());
    for (const auto& g : gpus) {
      FUZZ_CHECK(g.total_memory && g.free_memory && g.used_memory, "memory unknown");
      FUZZ_CHECK(*g.free_memory <= *g.total_memory, "free > total");
      FUZZ_CHECK(*g.used_memory == *g.total_memory - *g.free_memory, "used != total - free");
      FUZZ_CHECK(!g.compute_capability || (g.compute_capability->first < 100 && g.compute_capability->second < 100),
                 "compute capability %d.%d", g.compute_capability->first, g.compute_capability->second);
      FUZZ_CHECK(!g.utilization || (*g.utilization >= 0 && *g.utilization <= 100), "utilization %d", *g.utilization);
      FUZZ_CHECK(!g.processes || g.processes->size() <= 4096, "%zu processes", g.processes->size());
    }
  } catch (const std::invalid_argument& e) {
    check_message(e.what());
  }
  return 0;
}
