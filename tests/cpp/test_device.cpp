// Device strings, CUDA_VISIBLE_DEVICES rules, memory sizes, simulated topologies and selection.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include "common/units.h"
#include "device/device.h"
#include "device/discovery.h"
#include "device/random.h"
#include "device/select.h"
#include "device/simulated.h"
#include "device/visible_devices.h"

using namespace gpufleet;

namespace {

// Sets an environment variable for one test and restores it afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) setenv(name, value, 1); else unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1); else unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::vector<GpuIdentity> gpus(int n) {
  std::vector<GpuIdentity> out;
  for (int i = 0; i < n; ++i) out.push_back({fmt::format("GPU-{:x}{:07x}-aaaa", 10 + i, i), {}});
  return out;
}

std::vector<int> visible(std::optional<std::string_view> v, int n) {
  std::vector<int> out;
  for (const auto& d : parse_visible_devices(v, gpus(n))) out.push_back(d.gpu);
  return out;
}

}  // namespace

TEST(DeviceParse, AcceptedForms) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_EQ(Device::parse("cuda"), Device::cuda());
  EXPECT_EQ(Device::parse("cuda:0"), Device::cuda(0));
  EXPECT_EQ(Device::parse("cuda:17").index, 17);
  for (const char* s : {"cpu", "cuda", "cuda:0", "cuda:3", "cpu:0"}) EXPECT_EQ(Device::parse(s).str(), s);
  EXPECT_NE(Device::parse("cuda"), Device::parse("cuda:0"));
}

TEST(DeviceParse, ErrorsNameTheStringAndTheForms) {
  for (const char* bad : {"", "cuda:", "cuda:01", "cuda:-1", " cuda", "gpu", "CUDA", "cuda:1:2", "cuda:x",
                          "cuda:99999999999", "cuda:+1"}) {
    try {
      Device::parse(bad);
      FAIL() << "accepted '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(fmt::format("'{}'", bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("cuda:N"), std::string::npos) << msg;
    }
  }
  EXPECT_THROW(Device(DeviceType::CUDA, -2), std::invalid_argument);
}

TEST(DeviceParse, HashAndEquality) {
  std::hash<Device> h;
  EXPECT_EQ(h(Device::cuda(1)), h(Device::parse("cuda:1")));
  EXPECT_NE(h(Device::cuda(1)), h(Device::cuda(2)));
  EXPECT_NE(Device::cpu(), Device::cuda());
}

TEST(VisibleDevices, UnsetMeansAllEmptyMeansNone) {
  EXPECT_EQ(visible(std::nullopt, 3), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(visible("", 3), (std::vector<int>{}));
}

TEST(VisibleDevices, OrderAndStopAtFirstInvalid) {
  EXPECT_EQ(visible("2,1", 3), (std::vector<int>{2, 1}));
  EXPECT_EQ(visible("0,2,-1,1", 4), (std::vector<int>{0, 2}));
  EXPECT_EQ(visible("0,7,1", 4), (std::vector<int>{0}));       // out of range stops
  EXPECT_EQ(visible("1,x,0", 4), (std::vector<int>{1}));       // garbage stops
  EXPECT_EQ(visible("1,1,0", 4), (std::vector<int>{1}));       // duplicate stops
  EXPECT_EQ(visible("1,,0", 4), (std::vector<int>{1}));        // empty entry stops
  EXPECT_EQ(visible(" 1 , 0 ", 4), (std::vector<int>{1, 0}));  // surrounding spaces tolerated
  EXPECT_EQ(visible("-1", 4), (std::vector<int>{}));
}

TEST(VisibleDevices, UuidPrefixes) {
  const auto g = gpus(3);  // GPU-a0000000-aaaa, GPU-b0000001-aaaa, GPU-c0000002-aaaa
  auto one = [&](std::string_view v) {
    std::vector<int> out;
    for (const auto& d : parse_visible_devices(v, g)) out.push_back(d.gpu);
    return out;
  };
  EXPECT_EQ(one("GPU-b"), (std::vector<int>{1}));
  EXPECT_EQ(one("GPU-c0000002-aaaa,0"), (std::vector<int>{2, 0}));
  EXPECT_EQ(one("GPU-"), (std::vector<int>{}));       // ambiguous prefix stops
  EXPECT_EQ(one("b0000001"), (std::vector<int>{}));   // the GPU- part is required
  EXPECT_EQ(one("0,GPU-z"), (std::vector<int>{0}));   // unknown uuid stops
  EXPECT_EQ(one("GPU-a,0"), (std::vector<int>{0}));   // 0 again is a duplicate
}

TEST(VisibleDevices, MigEntries) {
  std::vector<GpuIdentity> g = {{"GPU-aaaa", {}}, {"GPU-bbbb", {"MIG-1111-2222", "MIG-3333-4444"}}};
  auto r = parse_visible_devices("MIG-3333", g);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].gpu, 1);
  EXPECT_EQ(r[0].mig_uuid, "MIG-3333-4444");
  r = parse_visible_devices("MIG-GPU-bbbb/1/0,0", g);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].gpu, 1);
  EXPECT_EQ(r[1].gpu, 0);
  EXPECT_TRUE(parse_visible_devices("MIG-9999", g).empty());
  // found by tests/fuzz/fuzz_visible_devices: instances must be numbers; a GPU is never counted whole
  // and as a MIG instance
  EXPECT_TRUE(parse_visible_devices("MIG-GPU-bbbb/&24,0", g).empty());
  EXPECT_TRUE(parse_visible_devices("MIG-GPU-bbbb/1", g).empty());
  EXPECT_EQ(parse_visible_devices("MIG-GPU-bbbb/1/0,1", g).size(), 1u);
  EXPECT_EQ(parse_visible_devices("1,MIG-1111", g).size(), 1u);
  EXPECT_EQ(parse_visible_devices("MIG-1111,MIG-3333", g).size(), 2u);  // two instances of one GPU
}

TEST(Units, ParseMemorySize) {
  EXPECT_EQ(parse_memory_size("4GiB"), 4ULL << 30);
  EXPECT_EQ(parse_memory_size("4 gib"), 4ULL << 30);
  EXPECT_EQ(parse_memory_size("4G"), 4ULL << 30);
  EXPECT_EQ(parse_memory_size("4GB"), 4000000000ULL);
  EXPECT_EQ(parse_memory_size("512MiB"), 512ULL << 20);
  EXPECT_EQ(parse_memory_size("1.5KiB"), 1536u);
  EXPECT_EQ(parse_memory_size("123"), 123u);
  EXPECT_EQ(parse_memory_size("0"), 0u);
  for (const char* bad : {"", "GiB", "-1GiB", "4 parsecs", "1.5", "1..5G", "4GiBs"}) {
    EXPECT_THROW(parse_memory_size(bad), std::invalid_argument) << bad;
  }
  EXPECT_EQ(format_memory_size(17), "17 B");
  EXPECT_EQ(format_memory_size(80ULL << 30), "80.0 GiB");
}

TEST(Simulated, CountAndJson) {
  auto four = parse_simulated_gpus("4");
  ASSERT_EQ(four.size(), 4u);
  EXPECT_EQ(*four[3].total_memory, 80ULL << 30);
  EXPECT_EQ(*four[3].free_memory, 80ULL << 30);
  EXPECT_EQ(*four[3].utilization, 0);
  auto custom = parse_simulated_gpus(
      R"([{"name": "A100", "total_memory": "40GiB", "free_memory": "10GiB", "utilization": 55,
          "processes": [{"pid": 12, "used_memory": "30GiB"}]}, {}])");
  ASSERT_EQ(custom.size(), 2u);
  EXPECT_EQ(custom[0].name, "A100");
  EXPECT_EQ(*custom[0].used_memory, 30ULL << 30);
  EXPECT_EQ(custom[0].processes->at(0).pid, 12u);
  EXPECT_EQ(*custom[1].free_memory, 80ULL << 30);
  EXPECT_NE(custom[0].uuid, custom[1].uuid);
}

TEST(Simulated, BadSpecsNameTheValue) {
  for (const char* bad : {"", "four", "-1", "[1]", R"([{"colour": "red"}])", R"([{"utilization": 150}])",
                          R"([{"total_memory": "1GiB", "free_memory": "2GiB"}])", R"({"a": 1})"}) {
    EXPECT_THROW(parse_simulated_gpus(bad), std::invalid_argument) << bad;
  }
}

TEST(Simulated, EnvironmentDrivesDiscoveryAndVisibility) {
  clear_simulated_gpus();
  ScopedEnv sim("GPUFLEET_SIMULATED_GPUS", "3");
  ScopedEnv cvd("CUDA_VISIBLE_DEVICES", "2,0");
  Topology t = discover();
  EXPECT_EQ(t.source, "simulated");
  ASSERT_EQ(t.gpus.size(), 3u);
  EXPECT_EQ(t.visible, (std::vector<int>{2, 0}));
  EXPECT_EQ(t.gpus[2].ordinal, 0);
  EXPECT_EQ(t.gpus[0].ordinal, 1);
  EXPECT_EQ(t.gpus[1].ordinal, -1);
  EXPECT_EQ(device_count(), 2);
}

TEST(Simulated, ApiOverridesEnvironmentAndUpdates) {
  ScopedEnv sim("GPUFLEET_SIMULATED_GPUS", "3");
  ScopedEnv cvd("CUDA_VISIBLE_DEVICES", nullptr);
  set_simulated_gpus(parse_simulated_gpus("2"));
  EXPECT_EQ(device_count(), 2);
  update_simulated_gpu(1, 1ULL << 30, 90, std::nullopt);
  auto d = devices();
  EXPECT_EQ(*d[1].free_memory, 1ULL << 30);
  EXPECT_EQ(*d[1].utilization, 90);
  EXPECT_THROW(update_simulated_gpu(5, std::nullopt, 1, std::nullopt), std::out_of_range);
  clear_simulated_gpus();
  EXPECT_EQ(device_count(), 3);
}

TEST(Discovery, NoSimulationNoDriverMeansZeroDevicesNoThrow) {
  clear_simulated_gpus();
  ScopedEnv sim("GPUFLEET_SIMULATED_GPUS", nullptr);
  ScopedEnv nvml("GPUFLEET_DISABLE_NVML", "1");
  Topology t;
  ASSERT_NO_THROW(t = discover());
  // This machine has no NVIDIA driver; on a GPU machine the CUDA runtime fallback finds devices.
  if (t.source == "none") {
    EXPECT_TRUE(t.gpus.empty());
    EXPECT_FALSE(t.notes.empty());
  }
  for (const auto& g : t.gpus) {
    EXPECT_FALSE(g.free_memory.has_value());  // unknown without NVML, never invented
    EXPECT_FALSE(g.utilization.has_value());
  }
}

TEST(Discovery, PciBusKeysCompareAcrossForms) {
  EXPECT_EQ(pci_bus_key("00000000:17:00.0"), pci_bus_key("0000:17:00.0"));
  EXPECT_LT(pci_bus_key("0000:17:00.0"), pci_bus_key("0000:65:00.0"));
  EXPECT_EQ(pci_bus_key("garbage"), -1);
}

TEST(Discovery, FastestFirstApproximationOnMixedMachines) {
  std::vector<DeviceInfo> g(3);
  g[0].name = "T4"; g[0].compute_capability = {7, 5}; g[0].pci_bus_id = "0000:01:00.0";
  g[1].name = "H100"; g[1].compute_capability = {9, 0}; g[1].pci_bus_id = "0000:02:00.0";
  g[2].name = "T4"; g[2].compute_capability = {7, 5}; g[2].pci_bus_id = "0000:03:00.0";
  bool exact = true;
  EXPECT_EQ(detail::cuda_enumeration_order(g, "PCI_BUS_ID", &exact), (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(exact);
  EXPECT_EQ(detail::cuda_enumeration_order(g, "FASTEST_FIRST", &exact), (std::vector<int>{1, 0, 2}));
  EXPECT_FALSE(exact);
}

namespace {
std::vector<DeviceInfo> snapshot(std::vector<std::pair<double, int>> free_gib_util) {
  std::vector<DeviceInfo> out;
  int i = 0;
  for (auto [gib, util] : free_gib_util) {
    DeviceInfo d;
    d.ordinal = d.nvml_index = i++;
    d.name = "Simulated GPU";
    d.total_memory = 80ULL << 30;
    d.free_memory = static_cast<std::uint64_t>(gib * (1ULL << 30));
    d.utilization = util;
    out.push_back(d);
  }
  return out;
}
}  // namespace

TEST(Select, OrdersAndTies) {
  auto s = snapshot({{10, 50}, {40, 90}, {40, 10}, {5, 0}});
  SelectOptions o;
  o.n = 4;
  EXPECT_EQ(evaluate_selection(s, o).chosen, (std::vector<int>{1, 2, 0, 3}));  // tie -> lower ordinal
  o.order = SelectOrder::Utilization;
  EXPECT_EQ(evaluate_selection(s, o).chosen, (std::vector<int>{3, 2, 0, 1}));
  o.order = SelectOrder::Index;
  EXPECT_EQ(evaluate_selection(s, o).chosen, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_THROW(parse_select_order("speed"), std::invalid_argument);
}

TEST(Select, ThresholdBoundariesAreInclusive) {
  auto s = snapshot({{10, 50}, {9.999, 50}, {10, 51}});
  SelectOptions o;
  o.n = 3;
  o.min_free_memory = 10ULL << 30;
  o.max_utilization = 50;
  auto sel = evaluate_selection(s, o);
  EXPECT_EQ(sel.chosen, (std::vector<int>{0}));
  EXPECT_NE(sel.verdicts[1].reason.find("required"), std::string::npos);
  EXPECT_NE(sel.verdicts[2].reason.find("51% busy"), std::string::npos);
}

TEST(Select, TooFewListsEveryDeviceAndWhy) {
  auto s = snapshot({{10, 50}, {1, 0}});
  SelectOptions o;
  o.n = 3;
  o.min_free_memory = 2ULL << 30;
  o.exclude = {0};
  try {
    select_devices(o, {}, [&] { return s; });
    FAIL();
  } catch (const DeviceSelectionError& e) {
    const std::string msg = e.what();
    EXPECT_FALSE(e.timed_out());
    EXPECT_NE(msg.find("0 of 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cuda:0 (Simulated GPU, physical 0): excluded"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cuda:1 (Simulated GPU, physical 1): 1.0 GiB free < 2.0 GiB required"), std::string::npos) << msg;
  }
}

TEST(Select, WaitsUntilEnoughQualifyOrTimesOut) {
  auto busy = snapshot({{1, 100}, {1, 100}});
  auto freed = snapshot({{1, 100}, {50, 0}});
  SelectOptions o;
  o.min_free_memory = 10ULL << 30;
  o.wait = true;
  o.timeout_s = 5.0;
  o.poll_interval_s = 0.05;
  int polls = 0;
  auto chosen = select_devices(o, {}, [&] { return ++polls < 4 ? busy : freed; });
  EXPECT_EQ(chosen, (std::vector<int>{1}));
  EXPECT_EQ(polls, 4);

  o.timeout_s = 0.3;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    select_devices(o, {}, [&] { return busy; });
    FAIL();
  } catch (const DeviceSelectionError& e) {
    EXPECT_TRUE(e.timed_out());
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, 0.3);
  EXPECT_LT(waited, 3.0);
}

TEST(Select, InterruptAbortsTheWait) {
  SelectOptions o;
  o.wait = true;
  o.poll_interval_s = 0.05;
  int checks = 0;
  auto busy = snapshot({{1, 100}});
  o.min_free_memory = 10ULL << 30;
  EXPECT_THROW(select_devices(o, [&] { if (++checks > 3) throw std::runtime_error("interrupted"); },
                              [&] { return busy; }),
               std::runtime_error);
}

TEST(Random, ManualSeedIsReproducible) {
  Generator g;
  g.manual_seed(42);
  const auto a = g.next_u64(), b = g.next_u64();
  g.manual_seed(42);
  EXPECT_EQ(g.next_u64(), a);
  EXPECT_EQ(g.next_u64(), b);
  EXPECT_NE(a, b);
  EXPECT_EQ(g.initial_seed(), 42u);
  auto [seed, offset] = g.reserve(10);
  EXPECT_EQ(seed, 42u);
  EXPECT_EQ(offset, 2u);
  EXPECT_EQ(g.offset(), 12u);
}
