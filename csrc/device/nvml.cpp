#include "device/nvml.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "common/error.h"

namespace gpufleet::nvml {

namespace {

// ---- the NVML ABI subset (nvml.h, CUDA 12/13) -------------------------------
using nvmlReturn_t = int;
using nvmlDevice_t = struct nvmlDevice_st*;
constexpr nvmlReturn_t NVML_SUCCESS = 0;
constexpr nvmlReturn_t NVML_ERROR_INSUFFICIENT_SIZE = 7;
constexpr unsigned long long NVML_VALUE_NOT_AVAILABLE = ~0ULL;

struct nvmlMemory_t {
  unsigned long long total, free, used;
};
struct nvmlUtilization_t {
  unsigned int gpu, memory;
};
struct nvmlPciInfo_t {  // the v3 layout
  char busIdLegacy[16];
  unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
  char busId[32];
};
struct nvmlProcessInfo_v1_t {
  unsigned int pid;
  unsigned long long usedGpuMemory;
};
struct nvmlProcessInfo_v2_t {  // used by _v2 and _v3 of GetComputeRunningProcesses
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId, computeInstanceId;
};

struct Api {
  void* handle = nullptr;
  bool ok = false;
  std::string error;
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  const char* (*error_string)(nvmlReturn_t) = nullptr;
  nvmlReturn_t (*get_count)(unsigned int*) = nullptr;
  nvmlReturn_t (*get_handle)(unsigned int, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*get_name)(nvmlDevice_t, char*, unsigned int) = nullptr;
  nvmlReturn_t (*get_uuid)(nvmlDevice_t, char*, unsigned int) = nullptr;
  nvmlReturn_t (*get_pci)(nvmlDevice_t, nvmlPciInfo_t*) = nullptr;
  nvmlReturn_t (*get_memory)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  nvmlReturn_t (*get_utilization)(nvmlDevice_t, nvmlUtilization_t*) = nullptr;
  nvmlReturn_t (*get_cc)(nvmlDevice_t, int*, int*) = nullptr;
  nvmlReturn_t (*get_procs_v2)(nvmlDevice_t, unsigned int*, nvmlProcessInfo_v2_t*) = nullptr;
  nvmlReturn_t (*get_procs_v1)(nvmlDevice_t, unsigned int*, nvmlProcessInfo_v1_t*) = nullptr;
  nvmlReturn_t (*driver_version)(char*, unsigned int) = nullptr;
  nvmlReturn_t (*cuda_driver_version)(int*) = nullptr;

  ~Api() {
    // Note [NVML lifetime]: one nvmlInit for the process, one matching nvmlShutdown at exit.
    if (ok && shutdown) shutdown();
    // The library stays mapped: other static destructors may still run after us.
  }

  std::string describe(nvmlReturn_t r) const {
    const char* s = error_string ? error_string(r) : nullptr;
    return s ? fmt::format("{} ({})", s, r) : fmt::format("NVML error {}", r);
  }
};

template <typename F>
bool resolve(void* h, F*& out, std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (void* p = dlsym(h, n)) {
      out = reinterpret_cast<F*>(p);
      return true;
    }
  }
  return false;
}

Api& api() {
  static Api a;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* path = std::getenv("GPUFLEET_NVML_LIBRARY");
    const char* lib = (path && *path) ? path : "libnvidia-ml.so.1";
    a.handle = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!a.handle) {
      const char* e = dlerror();
      a.error = fmt::format("NVML not available: could not load {} ({})", lib, e ? e : "unknown");
      return;
    }
    bool required = resolve(a.handle, a.init, {"nvmlInit_v2", "nvmlInit"}) &&
                    resolve(a.handle, a.shutdown, {"nvmlShutdown"}) &&
                    resolve(a.handle, a.get_count, {"nvmlDeviceGetCount_v2", "nvmlDeviceGetCount"}) &&
                    resolve(a.handle, a.get_handle,
                            {"nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex"});
    if (!required) {
      a.error = fmt::format("NVML not usable: {} lacks nvmlInit/nvmlDeviceGetCount", lib);
      return;
    }
    resolve(a.handle, a.error_string, {"nvmlErrorString"});
    resolve(a.handle, a.get_name, {"nvmlDeviceGetName"});
    resolve(a.handle, a.get_uuid, {"nvmlDeviceGetUUID"});
    resolve(a.handle, a.get_pci, {"nvmlDeviceGetPciInfo_v3"});
    resolve(a.handle, a.get_memory, {"nvmlDeviceGetMemoryInfo"});
    resolve(a.handle, a.get_utilization, {"nvmlDeviceGetUtilizationRates"});
    resolve(a.handle, a.get_cc, {"nvmlDeviceGetCudaComputeCapability"});
    if (!resolve(a.handle, a.get_procs_v2,
                 {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"})) {
      resolve(a.handle, a.get_procs_v1, {"nvmlDeviceGetComputeRunningProcesses"});
    }
    resolve(a.handle, a.driver_version, {"nvmlSystemGetDriverVersion"});
    resolve(a.handle, a.cuda_driver_version,
            {"nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"});
    nvmlReturn_t r = a.init();
    if (r != NVML_SUCCESS) {
      a.error = fmt::format("NVML failed to initialise: {}", a.describe(r));
      return;
    }
    a.ok = true;
  });
  return a;
}

std::optional<std::vector<GpuProcess>> read_processes(const Api& a, nvmlDevice_t dev) {
  auto convert = [](unsigned int pid, unsigned long long used) {
    GpuProcess p;
    p.pid = pid;
    if (used != NVML_VALUE_NOT_AVAILABLE) p.used_memory = used;
    return p;
  };
  // Ask with a growing buffer: the count may change between calls.
  for (unsigned int capacity = 16; capacity <= 4096; capacity *= 4) {
    unsigned int count = capacity;
    std::vector<GpuProcess> out;
    nvmlReturn_t r;
    if (a.get_procs_v2) {
      std::vector<nvmlProcessInfo_v2_t> buf(capacity);
      r = a.get_procs_v2(dev, &count, buf.data());
      if (r == NVML_SUCCESS)
        for (unsigned int i = 0; i < count; ++i) out.push_back(convert(buf[i].pid, buf[i].usedGpuMemory));
    } else if (a.get_procs_v1) {
      std::vector<nvmlProcessInfo_v1_t> buf(capacity);
      r = a.get_procs_v1(dev, &count, buf.data());
      if (r == NVML_SUCCESS)
        for (unsigned int i = 0; i < count; ++i) out.push_back(convert(buf[i].pid, buf[i].usedGpuMemory));
    } else {
      return std::nullopt;
    }
    if (r == NVML_SUCCESS) return out;
    if (r != NVML_ERROR_INSUFFICIENT_SIZE) return std::nullopt;
  }
  return std::nullopt;
}

}  // namespace

bool discover(Topology& topo) {
  if (const char* off = std::getenv("GPUFLEET_DISABLE_NVML"); off && *off && std::strcmp(off, "0") != 0) {
    topo.notes.push_back("NVML disabled by GPUFLEET_DISABLE_NVML");
    return false;
  }
  Api& a = api();
  if (!a.ok) {
    topo.notes.push_back(a.error);
    return false;
  }
  unsigned int count = 0;
  if (nvmlReturn_t r = a.get_count(&count); r != NVML_SUCCESS) {
    topo.notes.push_back(fmt::format("nvmlDeviceGetCount failed: {}", a.describe(r)));
    return false;
  }
  if (a.driver_version) {
    char buf[96] = {0};
    if (a.driver_version(buf, sizeof(buf)) == NVML_SUCCESS) topo.driver_version = buf;
  }
  if (a.cuda_driver_version) {
    int v = 0;
    if (a.cuda_driver_version(&v) == NVML_SUCCESS) topo.cuda_driver_version = v;
  }
  for (unsigned int i = 0; i < count; ++i) {
    nvmlDevice_t dev = nullptr;
    DeviceInfo info;
    info.source = "nvml";
    info.nvml_index = static_cast<int>(i);
    if (nvmlReturn_t r = a.get_handle(i, &dev); r != NVML_SUCCESS) {
      topo.notes.push_back(fmt::format("NVML device {}: no handle: {}", i, a.describe(r)));
      topo.gpus.push_back(std::move(info));
      continue;
    }
    char buf[128] = {0};
    if (a.get_name && a.get_name(dev, buf, sizeof(buf)) == NVML_SUCCESS) info.name = buf;
    std::memset(buf, 0, sizeof(buf));
    if (a.get_uuid && a.get_uuid(dev, buf, sizeof(buf)) == NVML_SUCCESS) info.uuid = buf;
    nvmlPciInfo_t pci{};
    if (a.get_pci && a.get_pci(dev, &pci) == NVML_SUCCESS) info.pci_bus_id = pci.busId;
    nvmlMemory_t mem{};
    if (a.get_memory && a.get_memory(dev, &mem) == NVML_SUCCESS) {
      info.total_memory = mem.total;
      info.free_memory = mem.free;
      info.used_memory = mem.used;
    }
    nvmlUtilization_t util{};
    if (a.get_utilization && a.get_utilization(dev, &util) == NVML_SUCCESS) {
      info.utilization = static_cast<int>(util.gpu);
    }
    int major = 0, minor = 0;
    if (a.get_cc && a.get_cc(dev, &major, &minor) == NVML_SUCCESS) info.compute_capability = {major, minor};
    info.processes = read_processes(a, dev);
    topo.gpus.push_back(std::move(info));
  }
  topo.source = "nvml";
  return true;
}

}  // namespace gpufleet::nvml
