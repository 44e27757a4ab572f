#pragma once
/// The dispatcher's vocabulary: a task (an argv command with its needs), the device pool, the events
/// a run reports and its options. See scheduler.h for the run loop.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpufleet::dispatch {

/// A declared output: the command writes `temp_path` (same directory), renamed to `final_path` on
/// success and removed on failure. See Note [Atomic outputs] in scheduler.cpp.
struct OutputFile {
  std::string final_path;
  std::string temp_path;
};

/// One command to run. Built by the Python layer (placeholders already expanded).
struct TaskSpec {
  std::int64_t seq = 0;        ///< position in the input (0-based), unique within a run
  std::string key;             ///< stable identity for the journal (resume)
  std::string name;            ///< shown in progress, logs and reports
  std::vector<std::string> argv;  ///< argv[0] is looked up in PATH when it has no '/'
  std::vector<std::pair<std::string, std::string>> env;  ///< added to / overriding the environment
  std::string cwd;             ///< empty: the dispatcher's working directory
  std::vector<OutputFile> outputs;
  int gpus = 1;                    ///< 0: CPU-only task (CUDA_VISIBLE_DEVICES=""), >1: multi-GPU task
  std::uint64_t min_free_memory = 0;  ///< bytes needed free on each of its GPUs before it starts
  double timeout_s = 0;            ///< 0: none
  int retries = 0;                 ///< extra attempts after a failure
  int affinity = -1;               ///< preferred pool position (-1: none); an idle device still steals
  int first_attempt = 1;           ///< number of its first attempt in this run (a queue re-running a job after a
                                   ///< restart continues its count); `retries` more follow a failure
};

/// A GPU of the pool. `visible_id` is what a task's CUDA_VISIBLE_DEVICES names (UUID for real GPUs,
/// the physical index for simulated ones).
struct PoolDevice {
  int ordinal = -1;       ///< CUDA ordinal in the dispatcher ("cuda:N")
  int physical_index = -1;
  std::string visible_id;
  std::string name;
};

/// Final state of one attempt / one task.
enum class TaskStatus { Succeeded, Failed, TimedOut, Cancelled, Skipped, NotStarted };
const char* status_name(TaskStatus s);

enum class EventKind { Started, Finished, Skipped, NotStarted, Message };

/// What the run loop reports (batched to the Python layer). Times are seconds since the Unix epoch.
struct TaskEvent {
  EventKind kind = EventKind::Message;
  std::int64_t seq = -1;
  std::string name;
  int attempt = 0;             ///< 1-based
  std::vector<int> devices;    ///< pool positions; empty for CPU tasks
  int slot = -1;
  double start = 0, end = 0;
  TaskStatus status = TaskStatus::Succeeded;
  std::optional<int> exit_code;
  std::optional<int> signal;
  bool final = true;           ///< Finished: no retry follows
  std::string log_path;
  std::string message;         ///< why it failed / was skipped; the text of a Message event
  std::int64_t pid = 0;
};

}  // namespace gpufleet::dispatch
