// Memory sizes ("4GiB", "1.5G", "512 MB", "123"): parse; a plain digit string is its exact value (or
// refused as too large past 2**64-1); the formatter takes every result.
#include <cstring>
#include <stdexcept>

#include "common/units.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  std::string_view text = as_text(data, size);
  bool digits = !text.empty() && text.size() < 64;
  unsigned __int128 exact = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      digits = false;
      break;
    }
    exact = exact * 10 + static_cast<unsigned>(c - '0');
  }
  try {
    std::uint64_t v = gpufleet::parse_memory_size(text);
    if (digits) FUZZ_CHECK(exact == v, "'%s' parsed as %llu", std::string(text).c_str(), static_cast<unsigned long long>(v));
    FUZZ_CHECK(!gpufleet::format_memory_size(v).empty(), "empty format");
  } catch (const std::invalid_argument& e) {
    check_message(e.what());
    FUZZ_CHECK(std::strstr(e.what(), "expected") || std::strstr(e.what(), "at most"), "message cut short: %s", e.what());
    if (digits) FUZZ_CHECK(exact > 18446744073709551615ULL, "'%s' refused: %s", std::string(text).c_str(), e.what());
  }
  return 0;
}
