#pragma once
/// User text inside error messages. A message travels as a C string (std::exception::what()) and is
/// decoded as UTF-8 by Python, so a NUL byte would cut it and a byte that is not UTF-8 would turn the
/// error into a UnicodeDecodeError. printable() keeps valid UTF-8 as it is and shows every other byte
/// and every control character as \xNN.
#include <cstddef>
#include <string>
#include <string_view>

namespace gpufleet {

/// `text` safe to put in a message: control characters (NUL included), DEL and bytes that are not
/// part of valid UTF-8 as \xNN; longer than `max_bytes`, it is shortened to its start and "... (N
/// bytes)". Valid UTF-8 (e.g. "é") stays as written.
std::string printable(std::string_view text, std::size_t max_bytes = 160);

/// Length of the valid UTF-8 sequence at the start of `s` (1 to 4), or 0 when `s` does not start
/// with one (a stray continuation byte, an overlong form, a surrogate, past U+10FFFF, cut short).
std::size_t utf8_sequence_length(std::string_view s);

}  // namespace gpufleet
