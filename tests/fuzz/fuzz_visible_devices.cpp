// CUDA_VISIBLE_DEVICES against a topology: the first byte picks how many GPUs exist (0-7) and whether
// GPU 1 has MIG instances; the rest is the variable's value.
#include <set>
#include <string>
#include <vector>

#include "device/visible_devices.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  if (size == 0) return 0;
  const int n = data[0] & 7;
  std::vector<gpufleet::GpuIdentity> gpus;
  std::size_t migs = 0;
  for (int i = 0; i < n; ++i) {
    gpufleet::GpuIdentity g;
    g.uuid = "GPU-" + std::string(i % 2 ? "8f2c" : "8f2d") + std::to_string(i) + "-0000-4000-8000-000000000000";
    if (i == 1 && (data[0] & 8)) g.mig_uuids = {"MIG-aaaa-1", "MIG-aaab-2"};
    migs += g.mig_uuids.size();
    gpus.push_back(g);
  }
  std::string_view value = as_text(data + 1, size - 1);
  auto out = gpufleet::parse_visible_devices(value, gpus);
  std::set<std::pair<int, std::string>> seen;
  std::set<int> whole, as_mig;
  std::size_t flat_migs = 0;
  for (const auto& d : out) {
    FUZZ_CHECK(d.gpu >= 0 && d.gpu < n, "gpu %d of %d", d.gpu, n);
    FUZZ_CHECK(seen.insert({d.gpu, d.mig_uuid}).second, "gpu %d listed twice", d.gpu);
    (d.mig_uuid.empty() ? whole : as_mig).insert(d.gpu);
    if (!d.mig_uuid.empty() && d.mig_uuid.rfind("MIG-GPU-", 0) != 0) ++flat_migs;
  }
  for (int g : whole) FUZZ_CHECK(!as_mig.count(g), "gpu %d visible whole and as a MIG instance", g);
  FUZZ_CHECK(flat_migs <= migs, "%zu MIG instances of %zu", flat_migs, migs);
  auto unset = gpufleet::parse_visible_devices(std::nullopt, gpus);
  FUZZ_CHECK(static_cast<int>(unset.size()) == n, "unset gives %zu of %d", unset.size(), n);
  return 0;
}
