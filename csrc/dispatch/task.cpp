#include "dispatch/task.h"

namespace gpufleet::dispatch {

const char* status_name(TaskStatus s) {
  switch (s) {
    case TaskStatus::Succeeded: return "succeeded";
    case TaskStatus::Failed: return "failed";
    case TaskStatus::TimedOut: return "timed_out";
    case TaskStatus::Cancelled: return "cancelled";
    case TaskStatus::Skipped: return "skipped";
    case TaskStatus::NotStarted: return "not_started";
  }
  return "unknown";
}

}  // namespace gpufleet::dispatch
