#include "common/units.h"

#include <cctype>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/printable.h"

namespace gpufleet {

namespace {
constexpr std::string_view kAccepted =
    "a non-negative number of bytes, optionally followed by a unit: B, KB, MB, GB, TB (powers of "
    "1000), KiB, MiB, GiB, TiB or K, M, G, T (powers of 1024), e.g. 4GiB, 512MB, 1.5G";
constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// Bytes per unit; 0 for an unknown unit. Every unit is a whole number of bytes, so a size is
// integer part × scale + fraction × scale, both computed exactly below.
std::uint64_t unit_scale(const std::string& u) {
  if (u.empty() || u == "b") return 1;
  if (u == "kb") return 1000ULL;
  if (u == "mb") return 1000ULL * 1000;
  if (u == "gb") return 1000ULL * 1000 * 1000;
  if (u == "tb") return 1000ULL * 1000 * 1000 * 1000;
  if (u == "k" || u == "kib") return 1ULL << 10;
  if (u == "m" || u == "mib") return 1ULL << 20;
  if (u == "g" || u == "gib") return 1ULL << 30;
  if (u == "t" || u == "tib") return 1ULL << 40;
  return 0;
}

// round(0.<frac> × scale), exactly (half rounds up): the decimal digits of frac × scale by long
// multiplication; the last frac.size() digits are the fractional part of the product.
std::uint64_t fraction_bytes(std::string_view frac, std::uint64_t scale) {
  std::vector<unsigned> digits;  // frac × scale, least significant digit first
  digits.reserve(frac.size() + 24);
  unsigned __int128 carry = 0;
  for (std::size_t i = frac.size(); i-- > 0;) {
    unsigned __int128 v = static_cast<unsigned __int128>(frac[i] - '0') * scale + carry;
    digits.push_back(static_cast<unsigned>(v % 10));
    carry = v / 10;
  }
  while (carry) {
    digits.push_back(static_cast<unsigned>(carry % 10));
    carry /= 10;
  }
  std::uint64_t whole = 0;  // < scale, so it fits
  for (std::size_t i = digits.size(); i-- > frac.size();) whole = whole * 10 + digits[i];
  const bool round_up = !frac.empty() && digits[frac.size() - 1] >= 5;
  return whole + (round_up ? 1 : 0);
}
}  // namespace

std::uint64_t parse_memory_size(std::string_view text) {
  std::string_view s = text;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  GF_CHECK_ARG(!s.empty(), "invalid memory size '{}': expected {}", printable(text), kAccepted);

  // digits [. digits] or . digits: parsed as text, never through a double (exact to the last byte).
  std::size_t i = 0;
  while (i < s.size() && is_digit(s[i])) ++i;
  std::string_view int_part = s.substr(0, i), frac_part;
  if (i < s.size() && s[i] == '.') {
    std::size_t j = ++i;
    while (i < s.size() && is_digit(s[i])) ++i;
    frac_part = s.substr(j, i - j);
  }
  GF_CHECK_ARG(!int_part.empty() || !frac_part.empty(), "invalid memory size '{}': expected {}", printable(text),
               kAccepted);
  std::string_view unit = s.substr(i);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) unit.remove_prefix(1);
  const std::uint64_t scale = unit_scale(lower(unit));
  GF_CHECK_ARG(scale > 0, "invalid memory size '{}': unknown unit '{}'; expected {}", printable(text),
               printable(unit), kAccepted);

  const auto too_large = [&] {
    return std::invalid_argument(fmt::format("invalid memory size '{}': too large; at most {} bytes (16 EiB)",
                                             printable(text), kMax));
  };
  while (int_part.size() > 1 && int_part.front() == '0') int_part.remove_prefix(1);
  if (int_part.size() > 20) throw too_large();
  unsigned __int128 bytes = 0;
  for (char c : int_part) bytes = bytes * 10 + static_cast<unsigned>(c - '0');
  bytes *= scale;
  if (bytes > kMax) throw too_large();
  while (!frac_part.empty() && frac_part.back() == '0') frac_part.remove_suffix(1);
  GF_CHECK_ARG(scale > 1 || frac_part.empty(),
               "invalid memory size '{}': a byte count must be a whole number; expected {}", printable(text),
               kAccepted);
  bytes += fraction_bytes(frac_part, scale);
  if (bytes > kMax) throw too_large();
  return static_cast<std::uint64_t>(bytes);
}

std::string format_memory_size(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  return fmt::format("{:.1f} {}", v, kUnits[u]);
}

}  // namespace gpufleet
