#pragma once
/// Choosing GPUs by free memory and utilisation, the way users of nvidia-smi scripts do it.
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "device/discovery.h"

namespace gpufleet {

enum class SelectOrder { FreeMemory, Utilization, Index };

/// Parses "free_memory", "utilization" or "index"; throws std::invalid_argument otherwise.
SelectOrder parse_select_order(const std::string& text);

struct SelectOptions {
  int n = 1;
  std::optional<std::uint64_t> min_free_memory;  ///< bytes; a device qualifies when free >= this
  std::optional<double> max_utilization;         ///< percent; qualifies when utilization <= this
  SelectOrder order = SelectOrder::FreeMemory;
  std::vector<int> exclude;                      ///< CUDA ordinals never chosen
  bool wait = false;
  std::optional<double> timeout_s;               ///< with wait: give up after this long (none: forever)
  double poll_interval_s = 1.0;
};

/// One device's verdict.
struct Verdict {
  DeviceInfo info;
  bool qualifies = false;
  std::string reason;  ///< why rejected, or a short "ok" summary
};

/// Selection over a snapshot: the verdict for every device, and the qualifying ones best first.
struct Selection {
  std::vector<Verdict> verdicts;  ///< in ordinal order
  std::vector<int> chosen;        ///< ordinals, best first, at most n
};

/// Pure: applies the options to `devices` (no waiting, no error when too few qualify).
Selection evaluate_selection(const std::vector<DeviceInfo>& devices, const SelectOptions& options);

/// Raised when fewer than n devices qualify; the message lists every device and why it was rejected.
class DeviceSelectionError : public std::runtime_error {
 public:
  DeviceSelectionError(const std::string& message, bool timed_out)
      : std::runtime_error(message), timed_out_(timed_out) {}
  bool timed_out() const noexcept { return timed_out_; }

 private:
  bool timed_out_;
};

/// Chooses `options.n` visible devices, best first (CUDA ordinals). With `wait`, polls until enough
/// qualify or the timeout passes. `check_interrupt` is called between polls and may throw to abort.
/// `discover_fn` is the snapshot source (real discovery by default).
std::vector<int> select_devices(const SelectOptions& options,
                                const std::function<void()>& check_interrupt = {},
                                const std::function<std::vector<DeviceInfo>()>& discover_fn = {});

}  // namespace gpufleet
