#include "device/visible_devices.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace gpufleet {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// The unique GPU whose UUID starts with `prefix`, or -1 (none, or ambiguous).
int match_uuid_prefix(std::string_view prefix, const std::vector<GpuIdentity>& gpus) {
  int found = -1;
  for (int i = 0; i < static_cast<int>(gpus.size()); ++i) {
    if (starts_with(gpus[i].uuid, prefix)) {
      if (found >= 0) return -1;
      found = i;
    }
  }
  return found;
}

// An integer entry as CUDA reads it: optional sign and digits only.
std::optional<long> parse_ordinal(std::string_view s) {
  if (s.empty()) return std::nullopt;
  std::size_t i = (s[0] == '-' || s[0] == '+') ? 1 : 0;
  if (i == s.size()) return std::nullopt;
  for (std::size_t j = i; j < s.size(); ++j) {
    if (!std::isdigit(static_cast<unsigned char>(s[j]))) return std::nullopt;
  }
  if (s.size() - i > 9) return s[0] == '-' ? -1L : 1L << 30;
  return std::stol(std::string(s));
}

// "<digits>/<digits>": the GPU and compute instance of a legacy MIG entry.
bool is_instance_pair(std::string_view s) {
  const auto slash = s.find('/');
  if (slash == std::string_view::npos || slash == 0 || slash + 1 == s.size()) return false;
  for (std::size_t i = 0; i < s.size(); ++i)
    if (i != slash && !std::isdigit(static_cast<unsigned char>(s[i]))) return false;
  return true;
}

}  // namespace

std::vector<VisibleDevice> parse_visible_devices(std::optional<std::string_view> value,
                                                 const std::vector<GpuIdentity>& gpus) {
  std::vector<VisibleDevice> out;
  if (!value) {
    for (int i = 0; i < static_cast<int>(gpus.size()); ++i) out.push_back({i, "", std::to_string(i)});
    return out;
  }
  std::string_view rest = *value;
  while (true) {
    const auto comma = rest.find(',');
    const std::string_view entry = trim(rest.substr(0, comma));
    VisibleDevice dev{-1, "", std::string(entry)};

    if (auto ordinal = parse_ordinal(entry)) {
      if (*ordinal >= 0 && *ordinal < static_cast<long>(gpus.size())) dev.gpu = static_cast<int>(*ordinal);
    } else if (starts_with(entry, "GPU-")) {
      dev.gpu = match_uuid_prefix(entry, gpus);
    } else if (starts_with(entry, "MIG-GPU-")) {
      // Legacy form MIG-GPU-<uuid>/<gpu instance>/<compute instance>, both instances numbers
      // ("MIG-GPU-<uuid>/&24" selected the GPU: found by tests/fuzz/fuzz_visible_devices).
      const std::string_view rest_mig = entry.substr(4);
      const auto slash = rest_mig.find('/');
      if (slash != std::string_view::npos && is_instance_pair(rest_mig.substr(slash + 1))) {
        dev.gpu = match_uuid_prefix(rest_mig.substr(0, slash), gpus);
        if (dev.gpu >= 0) dev.mig_uuid = std::string(entry);
      }
    } else if (starts_with(entry, "MIG-")) {
      for (int i = 0; i < static_cast<int>(gpus.size()) && dev.gpu < 0; ++i) {
        for (const auto& mig : gpus[i].mig_uuids) {
          if (starts_with(mig, entry)) {
            dev.gpu = i;
            dev.mig_uuid = mig;
            break;
          }
        }
      }
    }

    // Note [Duplicate entries]: a device listed twice ends the enumeration like any invalid entry,
    // so a GPU is never counted twice. A GPU named whole and as one of its MIG instances is listed
    // twice too (a GPU in MIG mode cannot be used whole; one that is not has no MIG instance).
    const bool duplicate = std::any_of(out.begin(), out.end(), [&](const VisibleDevice& d) {
      return d.gpu == dev.gpu && (d.mig_uuid == dev.mig_uuid || d.mig_uuid.empty() != dev.mig_uuid.empty());
    });
    if (dev.gpu < 0 || duplicate) break;
    out.push_back(std::move(dev));
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return out;
}

std::optional<std::string> visible_devices_env() {
  const char* v = std::getenv("CUDA_VISIBLE_DEVICES");
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

}  // namespace gpufleet
