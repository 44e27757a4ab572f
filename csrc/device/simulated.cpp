#include "device/simulated.h"

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/printable.h"
#include "common/units.h"

namespace gpufleet {

namespace {

constexpr std::uint64_t kDefaultMemory = 80ULL << 30;
constexpr long long kMaxProcessCount = 4096;
constexpr std::string_view kAccepted =
    "a count such as 4, or a JSON list of objects with the optional keys name, total_memory, "
    "free_memory, utilization, processes, compute_capability, uuid";

std::mutex g_mutex;
std::optional<std::vector<DeviceInfo>> g_override;  // guarded by g_mutex

DeviceInfo default_gpu(int i) {
  DeviceInfo d;
  d.source = "simulated";
  d.nvml_index = i;
  d.name = "Simulated GPU";
  d.uuid = fmt::format("GPU-00000000-0000-4000-8000-{:012x}", i);
  d.pci_bus_id = fmt::format("00000000:{:02X}:00.0", i + 1);
  d.compute_capability = {9, 0};
  d.total_memory = kDefaultMemory;
  d.free_memory = kDefaultMemory;
  d.used_memory = 0;
  d.utilization = 0;
  d.processes = std::vector<GpuProcess>{};
  return d;
}

std::uint64_t memory_value(const nlohmann::json& v, std::string_view key, int i) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();  // JSON parses every integer >= 0 as unsigned
  // A float (1e10) is a byte count when it is whole and below 2**64; a cast of anything else is undefined
  // (1e30 came back as 0).
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d >= 0 && d < 18446744073709551616.0 && d == static_cast<double>(static_cast<std::uint64_t>(d)))
      return static_cast<std::uint64_t>(d);
  }
  if (v.is_string()) {
    try {
      return parse_memory_size(v.get<std::string>());
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(fmt::format("simulated GPU {}: '{}': {}", i, key, e.what()));
    }
  }
  throw std::invalid_argument(fmt::format(
      "simulated GPU {}: '{}' must be a whole number of bytes from 0 to 18446744073709551615 or a size string "
      "like \"40GiB\", got {}",
      i, key, v.dump()));
}

// "M.m" with one or two digits each (real GPUs: 3.0 to 12.x); std::stoi on more digits threw
// std::out_of_range, and "9.0abc" passed as 9.0.
std::optional<std::pair<int, int>> parse_compute_capability(const std::string& s) {
  const auto dot = s.find('.');
  if (dot == std::string::npos || dot == 0 || dot > 2 || s.size() - dot - 1 == 0 || s.size() - dot - 1 > 2)
    return std::nullopt;
  int major = 0, minor = 0;
  for (std::size_t k = 0; k < s.size(); ++k) {
    if (k == dot) continue;
    if (s[k] < '0' || s[k] > '9') return std::nullopt;
    (k < dot ? major : minor) = (k < dot ? major : minor) * 10 + (s[k] - '0');
  }
  return std::pair{major, minor};
}

DeviceInfo parse_one(const nlohmann::json& obj, int i) {
  GF_CHECK_ARG(obj.is_object(), "simulated GPU {}: expected a JSON object, got {}; accepted: {}", i,
               obj.dump(), kAccepted);
  DeviceInfo d = default_gpu(i);
  for (const auto& [key, v] : obj.items()) {
    if (key == "name") {
      GF_CHECK_ARG(v.is_string(), "simulated GPU {}: 'name' must be a string, got {}", i, v.dump());
      d.name = v.get<std::string>();
    } else if (key == "uuid") {
      GF_CHECK_ARG(v.is_string() && v.get<std::string>().rfind("GPU-", 0) == 0,
                   "simulated GPU {}: 'uuid' must be a string starting with 'GPU-', got {}", i, v.dump());
      d.uuid = v.get<std::string>();
    } else if (key == "total_memory") {
      d.total_memory = memory_value(v, key, i);
    } else if (key == "free_memory") {
      d.free_memory = memory_value(v, key, i);
    } else if (key == "utilization") {
      GF_CHECK_ARG(v.is_number() && v.get<double>() >= 0 && v.get<double>() <= 100,
                   "simulated GPU {}: 'utilization' must be a number from 0 to 100, got {}", i, v.dump());
      d.utilization = static_cast<int>(v.get<double>());
    } else if (key == "compute_capability") {
      auto cc = parse_compute_capability(v.is_string() ? v.get<std::string>() : v.dump());
      GF_CHECK_ARG(cc.has_value(),
                   "simulated GPU {}: 'compute_capability' must look like \"9.0\" (major.minor, one or two digits "
                   "each), got {}",
                   i, v.dump());
      d.compute_capability = *cc;
    } else if (key == "processes") {
      std::vector<GpuProcess> procs;
      if (v.is_number_integer()) {
        GF_CHECK_ARG(v.is_number_unsigned() && v.get<std::uint64_t>() <= kMaxProcessCount,
                     "simulated GPU {}: 'processes' as a count must be from 0 to {}, got {}", i, kMaxProcessCount,
                     v.dump());
        for (std::uint64_t p = 0; p < v.get<std::uint64_t>(); ++p) procs.push_back({0, std::nullopt});
      } else if (v.is_array()) {
        for (const auto& p : v) {
          GF_CHECK_ARG(p.is_object() && p.contains("pid") && p["pid"].is_number_unsigned() &&
                           p["pid"].get<std::uint64_t>() <= 0xFFFFFFFFULL,
                       "simulated GPU {}: each process must be an object with an integer 'pid' from 0 to "
                       "4294967295, got {}",
                       i, p.dump());
          GF_CHECK_ARG(procs.size() < static_cast<std::size_t>(kMaxProcessCount),
                       "simulated GPU {}: at most {} processes", i, kMaxProcessCount);
          GpuProcess gp;
          gp.pid = static_cast<std::uint32_t>(p["pid"].get<std::uint64_t>());
          if (p.contains("used_memory")) gp.used_memory = memory_value(p["used_memory"], "used_memory", i);
          procs.push_back(gp);
        }
      } else {
        throw std::invalid_argument(fmt::format(
            "simulated GPU {}: 'processes' must be a count or a list of {{\"pid\": ..., \"used_memory\": ...}}, got {}",
            i, v.dump()));
      }
      d.processes = std::move(procs);
    } else {
      throw std::invalid_argument(fmt::format("simulated GPU {}: unknown key '{}'; accepted keys: name, "
                                              "total_memory, free_memory, utilization, processes, "
                                              "compute_capability, uuid",
                                              i, printable(key)));
    }
  }
  if (!obj.contains("free_memory")) d.free_memory = d.total_memory;
  GF_CHECK_ARG(*d.free_memory <= *d.total_memory,
               "simulated GPU {}: free_memory ({}) exceeds total_memory ({})", i,
               format_memory_size(*d.free_memory), format_memory_size(*d.total_memory));
  d.used_memory = *d.total_memory - *d.free_memory;
  return d;
}

}  // namespace

std::vector<DeviceInfo> parse_simulated_gpus(std::string_view spec) {
  std::string_view s = spec;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  GF_CHECK_ARG(!s.empty(), "invalid simulated GPU spec '{}': expected {}", printable(spec), kAccepted);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(s);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(
        fmt::format("invalid simulated GPU spec '{}': not a count or JSON ({}); expected {}", printable(spec),
                    printable(e.what()), kAccepted));
  }
  std::vector<DeviceInfo> out;
  if (j.is_number_integer()) {
    GF_CHECK_ARG(j.is_number_unsigned() && j.get<std::uint64_t>() <= 1024,
                 "invalid simulated GPU count {}: expected 0 to 1024", j.dump());
    const int n = static_cast<int>(j.get<std::uint64_t>());
    for (int i = 0; i < n; ++i) out.push_back(default_gpu(i));
    return out;
  }
  GF_CHECK_ARG(j.is_array(), "invalid simulated GPU spec '{}': expected {}", printable(spec), kAccepted);
  GF_CHECK_ARG(j.size() <= 1024, "invalid simulated GPU spec: {} GPUs listed, expected at most 1024", j.size());
  int i = 0;
  for (const auto& obj : j) out.push_back(parse_one(obj, i++));
  return out;
}

void set_simulated_gpus(std::vector<DeviceInfo> gpus) {
  for (std::size_t i = 0; i < gpus.size(); ++i) {
    gpus[i].nvml_index = static_cast<int>(i);
    gpus[i].source = "simulated";
  }
  std::lock_guard lock(g_mutex);
  g_override = std::move(gpus);
}

void clear_simulated_gpus() {
  std::lock_guard lock(g_mutex);
  g_override.reset();
}

std::optional<std::vector<DeviceInfo>> simulated_gpus() {
  {
    std::lock_guard lock(g_mutex);
    if (g_override) return g_override;
  }
  const char* env = std::getenv("GPUFLEET_SIMULATED_GPUS");
  if (env == nullptr || *env == '\0') return std::nullopt;
  return parse_simulated_gpus(env);
}

std::string simulation_origin() {
  {
    std::lock_guard lock(g_mutex);
    if (g_override) return "api";
  }
  const char* env = std::getenv("GPUFLEET_SIMULATED_GPUS");
  return (env && *env) ? "env" : "";
}

void update_simulated_gpu(int index, std::optional<std::uint64_t> free_memory,
                          std::optional<int> utilization,
                          std::optional<std::vector<GpuProcess>> processes) {
  std::lock_guard lock(g_mutex);
  if (!g_override) {
    const char* env = std::getenv("GPUFLEET_SIMULATED_GPUS");
    if (env == nullptr || *env == '\0')
      throw std::logic_error("update_simulated_gpu: no simulated topology is in effect");
    g_override = parse_simulated_gpus(env);  // the live state now lives in the API override
  }
  if (index < 0 || index >= static_cast<int>(g_override->size()))
    throw std::out_of_range(fmt::format("simulated GPU index {} is out of range: {} GPUs are simulated",
                                        index, g_override->size()));
  DeviceInfo& d = (*g_override)[index];
  if (free_memory) {
    GF_CHECK_ARG(*free_memory <= *d.total_memory, "free_memory {} exceeds simulated GPU {}'s total of {}",
                 format_memory_size(*free_memory), index, format_memory_size(*d.total_memory));
    d.free_memory = free_memory;
    d.used_memory = *d.total_memory - *free_memory;
  }
  if (utilization) {
    GF_CHECK_ARG(*utilization >= 0 && *utilization <= 100, "utilization must be 0 to 100, got {}", *utilization);
    d.utilization = utilization;
  }
  if (processes) d.processes = std::move(processes);
}

}  // namespace gpufleet
