#include "common/units.h"

#include <cctype>
#include <cmath>
#include <string>

#include "common/error.h"

namespace gpufleet {

namespace {
constexpr std::string_view kAccepted =
    "a non-negative number of bytes, optionally followed by a unit: B, KB, MB, GB, TB (powers of "
    "1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024), e.g. 4GiB, 512MB, 1.5G";

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}
}  // namespace

std::uint64_t parse_memory_size(std::string_view text) {
  std::string_view s = text;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  GF_CHECK_ARG(!s.empty(), "invalid memory size '{}': expected {}", text, kAccepted);

  std::size_t i = 0;
  bool seen_digit = false, seen_dot = false;
  while (i < s.size()) {
    char c = s[i];
    if (std::isdigit(static_cast<unsigned char>(c))) {
      seen_digit = true;
    } else if (c == '.' && !seen_dot) {
      seen_dot = true;
    } else {
      break;
    }
    ++i;
  }
  GF_CHECK_ARG(seen_digit, "invalid memory size '{}': expected {}", text, kAccepted);
  const double number = std::stod(std::string(s.substr(0, i)));
  std::string_view unit = s.substr(i);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) unit.remove_prefix(1);
  const std::string u = lower(unit);

  double scale = 0;
  if (u.empty() || u == "b") scale = 1;
  else if (u == "kb") scale = 1e3;
  else if (u == "mb") scale = 1e6;
  else if (u == "gb") scale = 1e9;
  else if (u == "tb") scale = 1e12;
  else if (u == "k" || u == "kib") scale = 1024.0;
  else if (u == "m" || u == "mib") scale = 1024.0 * 1024;
  else if (u == "g" || u == "gib") scale = 1024.0 * 1024 * 1024;
  else if (u == "t" || u == "tib") scale = 1024.0 * 1024 * 1024 * 1024;
  GF_CHECK_ARG(scale > 0, "invalid memory size '{}': unknown unit '{}'; expected {}", text, unit,
               kAccepted);
  const double bytes = number * scale;
  GF_CHECK_ARG(bytes < 1.8e19, "invalid memory size '{}': too large", text);
  GF_CHECK_ARG(scale > 1 || std::floor(number) == number,
               "invalid memory size '{}': a byte count must be a whole number", text);
  return static_cast<std::uint64_t>(std::llround(bytes));
}

std::string format_memory_size(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  return fmt::format("{:.1f} {}", v, kUnits[u]);
}

}  // namespace gpufleet
