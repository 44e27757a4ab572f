#pragma once
/// CUDA_VISIBLE_DEVICES with CUDA's own rules (see ../shared/REFERENCE.md):
/// unset -> all GPUs in enumeration order; "" -> none; comma-separated entries enumerated in the order
/// listed; entries are integer ordinals, `GPU-<uuid>` (a unique prefix suffices), `MIG-GPU-<uuid>/<gi>/<ci>`
/// or `MIG-<uuid>`; enumeration stops at the first invalid entry (unknown, out of range, ambiguous
/// prefix, or a device already listed).
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace gpufleet {

/// What parse_visible_devices needs to know of one GPU, in CUDA enumeration order.
struct GpuIdentity {
  std::string uuid;                    ///< "GPU-8f2c...", as NVML prints it
  std::vector<std::string> mig_uuids;  ///< "MIG-..." of its MIG instances, if any
};

/// One visible device: the GPU's position in the enumeration list, and the MIG instance if the
/// entry named one.
struct VisibleDevice {
  int gpu = -1;          ///< index into the list passed to parse_visible_devices
  std::string mig_uuid;  ///< non-empty when the entry selected a MIG instance
  std::string entry;     ///< the entry as written
  friend bool operator==(const VisibleDevice&, const VisibleDevice&) = default;
};

/// Applies a CUDA_VISIBLE_DEVICES value (nullopt = unset) to the GPUs in enumeration order.
std::vector<VisibleDevice> parse_visible_devices(std::optional<std::string_view> value,
                                                 const std::vector<GpuIdentity>& gpus);

/// Reads CUDA_VISIBLE_DEVICES from the environment (nullopt when unset).
std::optional<std::string> visible_devices_env();

}  // namespace gpufleet
