// The CUDA runtime fallback for discovery, compiled only with CUDA (Note [Source conventions]).
// cudaGetDeviceCount/cudaGetDeviceProperties initialise the driver but create no context; free
// memory, utilisation and processes need NVML and are left unknown here.
#include <cuda_runtime_api.h>

#include "common/error.h"
#include "device/discovery.h"
#include "device/visible_devices.h"

namespace gpufleet::detail {

bool discover_with_cuda_runtime(Topology& topo) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    topo.notes.push_back(fmt::format("CUDA runtime reports no usable GPU: {} ({})", cudaGetErrorName(err),
                                     cudaGetErrorString(err)));
    return false;
  }
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) topo.cuda_driver_version = driver;
  topo.source = "cuda";
  topo.cuda_visible_devices = visible_devices_env();
  const char* order_env = std::getenv("CUDA_DEVICE_ORDER");
  topo.device_order = (order_env && std::string(order_env) == "PCI_BUS_ID") ? "PCI_BUS_ID" : "FASTEST_FIRST";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    DeviceInfo info;
    info.source = "cuda";
    info.ordinal = i;
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
      info.name = prop.name;
      const auto* u = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
      info.uuid = fmt::format("GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                              u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
                              u[12], u[13], u[14], u[15]);
      info.pci_bus_id = fmt::format("{:08X}:{:02X}:{:02X}.0", prop.pciDomainID, prop.pciBusID, prop.pciDeviceID);
      info.compute_capability = {prop.major, prop.minor};
      info.total_memory = prop.totalGlobalMem;
    } else {
      (void)cudaGetLastError();
    }
    topo.gpus.push_back(std::move(info));
    topo.visible.push_back(i);
  }
  topo.notes.push_back("NVML unavailable: free/used memory, utilisation and processes are unknown");
  return true;
}

std::optional<int> cuda_runtime_version() {
  return CUDART_VERSION;  // the runtime linked into gpufleet (static)
}

}  // namespace gpufleet::detail
