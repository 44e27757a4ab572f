// Device strings ("cpu", "cuda", "cuda:N"): parse, and a parsed device prints back to itself.
#include <cstring>
#include <stdexcept>

#include "device/device.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  std::string_view text = as_text(data, size);
  try {
    gpufleet::Device d = gpufleet::Device::parse(text);
    FUZZ_CHECK(d.index >= -1, "index %d", d.index);
    FUZZ_CHECK(gpufleet::Device::parse(d.str()) == d, "'%s' does not round-trip", d.str().c_str());
    FUZZ_CHECK(d.str() == text, "'%s' was accepted but prints as '%s'", std::string(text).c_str(), d.str().c_str());
  } catch (const std::invalid_argument& e) {
    check_message(e.what());
    // the whole message arrives (a NUL byte of the input used to cut it before the accepted forms)
    FUZZ_CHECK(std::strstr(e.what(), "Expected 'cpu'") != nullptr, "message cut short: %s", e.what());
  }
  return 0;
}
