#pragma once
// Shared by the libFuzzer targets (see README.md): what counts as a bug. A parser may refuse its input
// with std::invalid_argument (the documented error, a ValueError in Python); any other exception, a
// sanitizer report, an abort or a broken invariant (FUZZ_CHECK) is a crash that libFuzzer saves.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#define FUZZ_CHECK(cond, ...)                                  \
  do {                                                         \
    if (!(cond)) {                                             \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s: ", #cond);  \
      std::fprintf(stderr, __VA_ARGS__);                       \
      std::fprintf(stderr, "\n");                              \
      std::abort();                                            \
    }                                                          \
  } while (0)

inline std::string_view as_text(const unsigned char* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Error messages must name the value readably: no NUL byte (it would cut the message on its way to
// Python) and valid UTF-8 (or Python raises UnicodeDecodeError instead of the error).
void check_message(const char* what);
