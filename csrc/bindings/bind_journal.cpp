// Bindings for the run journal (csrc/dispatch/journal.h) on its own, for a run whose tasks are
// started by other processes: a cluster run's driver records what its agents report
// (python/gpufleet/cluster/_driver.py), so a cluster journal is the same file, read by the same
// `gpufleet journal` and resumed by the same rules as a local one.
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "bindings/bindings.h"
#include "dispatch/journal.h"
#include "dispatch/task.h"

namespace gpufleet::bindings {

using namespace gpufleet::dispatch;

namespace {

TaskStatus parse_status(const std::string& s) {
  for (TaskStatus t : {TaskStatus::Succeeded, TaskStatus::Failed, TaskStatus::TimedOut, TaskStatus::Cancelled,
                       TaskStatus::Skipped, TaskStatus::NotStarted})
    if (s == status_name(t)) return t;
  throw std::invalid_argument("status must be succeeded, failed, timed_out, cancelled, skipped or not_started, got '" +
                              s + "'");
}

TaskEvent attempt_event(const TaskSpec& t, int attempt, int slot, double start, double end, const std::string& log_path) {
  TaskEvent e;
  e.seq = t.seq;
  e.name = t.name;
  e.attempt = attempt;
  e.slot = slot;
  e.start = start;
  e.end = end;
  e.log_path = log_path;
  return e;
}

}  // namespace

void bind_journal(py::module_& m) {
  // Every call commits before it returns (journal.cpp); none is long enough to release the GIL for.
  py::class_<Journal>(m, "Journal")
      .def(py::init<std::string>(), py::arg("path"))
      .def("begin_run", &Journal::begin_run, py::arg("run_id"), py::arg("description"))
      .def("end_run", &Journal::end_run, py::arg("run_id"), py::arg("status"))
      .def(
          "lookup",
          [](Journal& j, const std::string& key) -> std::optional<std::pair<std::string, double>> {
            auto e = j.lookup(key);
            if (!e) return std::nullopt;
            return std::make_pair(e->state, e->start);
          },
          py::arg("key"), "(state, start of its last attempt) of the task with this key, or None")
      .def(
          "record_start",
          [](Journal& j, const TaskSpec& t, int attempt, const std::string& devices, int slot, double start,
             const std::string& log_path, const std::string& run_id) {
            j.record_start(t, attempt_event(t, attempt, slot, start, 0, log_path), devices, run_id);
          },
          py::arg("task"), py::arg("attempt"), py::arg("devices"), py::arg("slot"), py::arg("start"),
          py::arg("log_path"), py::arg("run_id"))
      .def(
          "record_finish",
          [](Journal& j, const TaskSpec& t, int attempt, const std::string& devices, int slot, double start, double end,
             const std::string& status, std::optional<int> exit_code, std::optional<int> signal, bool final,
             const std::string& log_path, const std::string& message, const std::string& run_id) {
            TaskEvent e = attempt_event(t, attempt, slot, start, end, log_path);
            e.kind = EventKind::Finished;
            e.status = parse_status(status);
            e.exit_code = exit_code;
            e.signal = signal;
            e.final = final;
            e.message = message;
            j.record_finish(t, e, devices, run_id);
          },
          py::arg("task"), py::arg("attempt"), py::arg("devices"), py::arg("slot"), py::arg("start"), py::arg("end"),
          py::arg("status"), py::arg("exit_code"), py::arg("signal"), py::arg("final"), py::arg("log_path"),
          py::arg("message"), py::arg("run_id"))
      .def_property_readonly("path", &Journal::path);
}

}  // namespace gpufleet::bindings
