#pragma once
/// gpufleet::Device: where data lives or work runs. Parsed in one place, printed the PyTorch way.
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

namespace gpufleet {

enum class DeviceType : int { CPU = 0, CUDA = 1 };

/// A device such as `cpu`, `cuda` (the current CUDA device) or `cuda:1`.
/// `index == -1` means "no index given". `str()` round-trips through `parse()`.
struct Device {
  DeviceType type = DeviceType::CPU;
  int index = -1;

  constexpr Device() = default;
  /// Throws std::invalid_argument for a negative index other than -1.
  Device(DeviceType type, int index);

  static Device cpu() { return Device(DeviceType::CPU, -1); }
  static Device cuda(int index = -1) { return Device(DeviceType::CUDA, index); }

  /// Parses `cpu`, `cpu:N`, `cuda`, `cuda:N` (N a non-negative integer without leading zeros).
  /// Throws std::invalid_argument naming the string and the accepted forms.
  static Device parse(std::string_view text);

  bool is_cpu() const noexcept { return type == DeviceType::CPU; }
  bool is_cuda() const noexcept { return type == DeviceType::CUDA; }
  bool has_index() const noexcept { return index >= 0; }

  std::string str() const;
  friend bool operator==(const Device&, const Device&) = default;
};

/// "cpu" or "cuda".
std::string_view device_type_name(DeviceType type);

/// The accepted device-string forms, for error messages.
inline constexpr std::string_view kAcceptedDeviceForms =
    "'cpu', 'cuda' or 'cuda:N' where N is a non-negative integer without leading zeros (e.g. 'cuda:1')";

}  // namespace gpufleet

template <>
struct std::hash<gpufleet::Device> {
  std::size_t operator()(const gpufleet::Device& d) const noexcept {
    return std::hash<int>()(static_cast<int>(d.type) * 1000003 + d.index);
  }
};
