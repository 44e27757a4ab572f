// The kernels' memory backend choice (Note [Kernel memory backend]) and the CPU-only stand-ins for the
// CUDA lifetimes (array_cuda.cpp implements them in CUDA builds).
#include "kernels/device_memory.h"

#include <string_view>

#include "common/error.h"
#include "kernels/array.h"

namespace gpufleet::kernels {

MemoryBackend choose_memory_backend(bool pools_supported, const char* override_value) {
  const std::string_view v = override_value ? override_value : "";
  if (v.empty() || v == "auto") return pools_supported ? MemoryBackend::AsyncPool : MemoryBackend::Caching;
  if (v == "caching") return MemoryBackend::Caching;
  if (v == "pool") {
    GF_CHECK_ARG(pools_supported,
                 "GPUFLEET_KERNELS_MEMORY=pool, but this device or driver has no CUDA memory pools "
                 "(cudaDevAttrMemoryPoolsSupported is 0): unset it, or set it to 'caching'");
    return MemoryBackend::AsyncPool;
  }
  throw std::invalid_argument(fmt::format(
      "GPUFLEET_KERNELS_MEMORY='{}' is invalid: expected 'auto' (or unset: a CUDA memory pool where the device "
      "supports one), 'pool' or 'caching' (gpufleet's caching allocator on cudaMalloc)",
      v));
}

const char* memory_backend_name(MemoryBackend b) { return b == MemoryBackend::AsyncPool ? "pool" : "caching"; }

#if !GPUFLEET_WITH_CUDA
class Production {};
std::shared_ptr<Production> record_production(Device device, std::uintptr_t) {
  if (device.is_cuda()) throw_no_cuda("record_production");
  return nullptr;
}
bool production_done(const std::shared_ptr<Production>&) { return true; }
void wait_production(const std::shared_ptr<Production>&) {}
#endif

}  // namespace gpufleet::kernels
