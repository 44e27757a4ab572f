#include "fuzz_common.h"

#include <cstring>

#include "common/printable.h"

void check_message(const char* what) {
  std::string_view m(what);
  for (std::size_t i = 0; i < m.size();) {
    std::size_t n = gpufleet::utf8_sequence_length(m.substr(i));
    FUZZ_CHECK(n > 0, "the message is not UTF-8 at byte %zu: %s", i, what);
    i += n;
  }
  FUZZ_CHECK(std::strlen(what) > 0, "empty message");
}
