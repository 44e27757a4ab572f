#include "device/device.h"

#include <cctype>

#include "common/error.h"
#include "common/printable.h"

namespace gpufleet {

Device::Device(DeviceType type_, int index_) : type(type_), index(index_) {
  GF_CHECK_ARG(index_ >= -1, "device index must be a non-negative integer, got {}", index_);
}

std::string_view device_type_name(DeviceType type) {
  return type == DeviceType::CUDA ? "cuda" : "cpu";
}

Device Device::parse(std::string_view text) {
  auto fail = [&](std::string_view why) -> Device {
    throw std::invalid_argument(fmt::format("Invalid device string: '{}': {}. Expected {}", printable(text),
                                            why, kAcceptedDeviceForms));
  };
  if (text.empty()) return fail("the string is empty");
  const auto colon = text.find(':');
  const std::string_view type_text = text.substr(0, colon);
  DeviceType type;
  if (type_text == "cpu") {
    type = DeviceType::CPU;
  } else if (type_text == "cuda") {
    type = DeviceType::CUDA;
  } else {
    return fail(fmt::format("unknown device type '{}'", printable(type_text)));
  }
  if (colon == std::string_view::npos) return Device(type, -1);

  const std::string_view digits = text.substr(colon + 1);
  if (digits.empty()) return fail("the index after ':' is missing");
  for (char c : digits) {
    if (!std::isdigit(static_cast<unsigned char>(c))) {
      return fail(fmt::format("the index '{}' is not a non-negative integer", printable(digits)));
    }
  }
  if (digits.size() > 1 && digits.front() == '0') {
    return fail(fmt::format("the index '{}' has a leading zero", digits));
  }
  if (digits.size() > 9) return fail(fmt::format("the index '{}' is too large", digits));
  return Device(type, std::stoi(std::string(digits)));
}

std::string Device::str() const {
  if (index < 0) return std::string(device_type_name(type));
  return fmt::format("{}:{}", device_type_name(type), index);
}

}  // namespace gpufleet
