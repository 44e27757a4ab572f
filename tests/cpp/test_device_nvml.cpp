// The NVML discovery path, run against tests/fake_nvml (a stand-in libnvidia-ml.so.1 with NVML's
// ABI) because this machine has no driver. On a GPU machine the same code reads the real NVML.
#include <gtest/gtest.h>

#include <cstdlib>

#include "device/discovery.h"
#include "device/simulated.h"

using namespace gpufleet;

namespace {

constexpr const char* kTopology =
    // NVML order is PCI bus order: 17, 65, b3.
    "NVIDIA A100-SXM4-40GB|GPU-11111111-aaaa|00000000:17:00.0|42949672960|10737418240|37|8.0|1234:1073741824,99:-;"
    "NVIDIA H100 80GB HBM3|GPU-22222222-bbbb|00000000:65:00.0|85899345920|85899345920|-|9.0|;"
    "NVIDIA A100-SXM4-40GB|GPU-33333333-cccc|00000000:B3:00.0|42949672960|42949672960|0|8.0|";

class NvmlDiscovery : public ::testing::Test {
 protected:
  void SetUp() override {
    clear_simulated_gpus();
    unsetenv("GPUFLEET_SIMULATED_GPUS");
    unsetenv("GPUFLEET_DISABLE_NVML");
    unsetenv("CUDA_VISIBLE_DEVICES");
    unsetenv("CUDA_DEVICE_ORDER");
    setenv("GPUFLEET_NVML_LIBRARY", FAKE_NVML_PATH, 1);
    setenv("FAKE_NVML_GPUS", kTopology, 1);
  }
};

}  // namespace

TEST_F(NvmlDiscovery, ReadsEveryField) {
  Topology t = discover();
  ASSERT_EQ(t.source, "nvml") << (t.notes.empty() ? "" : t.notes.front());
  ASSERT_EQ(t.gpus.size(), 3u);
  EXPECT_EQ(t.driver_version, "999.99.99-fake");
  EXPECT_EQ(t.cuda_driver_version, 13000);
  const DeviceInfo& a = t.gpus[0];
  EXPECT_EQ(a.name, "NVIDIA A100-SXM4-40GB");
  EXPECT_EQ(a.uuid, "GPU-11111111-aaaa");
  EXPECT_EQ(a.pci_bus_id, "00000000:17:00.0");
  EXPECT_EQ(a.nvml_index, 0);
  EXPECT_EQ(*a.total_memory, 40ULL << 30);
  EXPECT_EQ(*a.free_memory, 10ULL << 30);
  EXPECT_EQ(*a.used_memory, 30ULL << 30);
  EXPECT_EQ(*a.utilization, 37);
  EXPECT_EQ(a.compute_capability, (std::pair<int, int>{8, 0}));
  ASSERT_TRUE(a.processes.has_value());
  ASSERT_EQ(a.processes->size(), 2u);
  EXPECT_EQ((*a.processes)[0].pid, 1234u);
  EXPECT_EQ(*(*a.processes)[0].used_memory, 1ULL << 30);
  EXPECT_FALSE((*a.processes)[1].used_memory.has_value());  // NVML_VALUE_NOT_AVAILABLE
  EXPECT_FALSE(t.gpus[1].utilization.has_value());           // NOT_SUPPORTED stays unknown
  EXPECT_EQ(t.gpus[1].unknown_fields(), (std::vector<std::string>{"utilization"}));
}

TEST_F(NvmlDiscovery, PciOrderAndVisibleDevices) {
  setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID", 1);
  setenv("CUDA_VISIBLE_DEVICES", "2,GPU-1111", 1);
  Topology t = discover();
  EXPECT_EQ(t.visible, (std::vector<int>{2, 0}));
  EXPECT_EQ(t.gpus[2].ordinal, 0);
  EXPECT_EQ(t.gpus[0].ordinal, 1);
  EXPECT_EQ(t.gpus[1].ordinal, -1);
  EXPECT_TRUE(t.ordinal_order_exact);
}

TEST_F(NvmlDiscovery, FastestFirstPutsTheNewestArchitectureFirst) {
  Topology t = discover();  // CUDA_DEVICE_ORDER unset = FASTEST_FIRST, on a mixed machine
  EXPECT_EQ(t.device_order, "FASTEST_FIRST");
  EXPECT_FALSE(t.ordinal_order_exact);
  EXPECT_EQ(t.visible, (std::vector<int>{1, 0, 2}));  // H100 first, then the A100s in PCI order
  EXPECT_EQ(t.gpus[1].ordinal, 0);
  setenv("CUDA_VISIBLE_DEVICES", "1", 1);  // ordinal 1 under FASTEST_FIRST is the first A100
  EXPECT_EQ(discover().visible, (std::vector<int>{0}));
}

TEST_F(NvmlDiscovery, SimulationTakesPrecedence) {
  setenv("GPUFLEET_SIMULATED_GPUS", "2", 1);
  Topology t = discover();
  EXPECT_EQ(t.source, "simulated");
  EXPECT_EQ(t.gpus.size(), 2u);
  unsetenv("GPUFLEET_SIMULATED_GPUS");
  EXPECT_EQ(discover().source, "nvml");
}

TEST_F(NvmlDiscovery, DisabledNvmlFallsBack) {
  setenv("GPUFLEET_DISABLE_NVML", "1", 1);
  Topology t = discover();
  EXPECT_NE(t.source, "nvml");
  ASSERT_FALSE(t.notes.empty());
  EXPECT_NE(t.notes.front().find("GPUFLEET_DISABLE_NVML"), std::string::npos);
}
