#pragma once
// Helpers shared by the dispatcher's C++ tests (test_dispatch.cpp, test_dispatch_queue.cpp).
#include <cstdint>
#include <string>
#include <vector>

#include "dispatch/task.h"

namespace gpufleet::dispatch::test_util {

// n simulated GPUs: ordinal, physical index and CUDA_VISIBLE_DEVICES value i.
inline std::vector<PoolDevice> fake_pool(int n) {
  std::vector<PoolDevice> p;
  for (int i = 0; i < n; ++i) p.push_back({i, i, std::to_string(i), "sim"});
  return p;
}

// A task running `script` with /bin/sh -c.
inline TaskSpec sh(std::int64_t seq, const std::string& script) {
  TaskSpec t;
  t.seq = seq;
  t.key = "k" + std::to_string(seq);
  t.name = "t" + std::to_string(seq);
  t.argv = {"/bin/sh", "-c", script};
  return t;
}

}  // namespace gpufleet::dispatch::test_util
