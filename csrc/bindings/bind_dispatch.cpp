// Bindings for csrc/dispatch: TaskSpec, TaskEvent, the Dispatcher run loop (GIL released; the hooks
// take it briefly), the supervisor for other process owners (the executor), the pool.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <memory>

#include "bindings/bindings.h"
#include "common/error.h"
#include "dispatch/journal.h"
#include "dispatch/pool.h"
#include "dispatch/process.h"
#include "dispatch/scheduler.h"
#include "dispatch/supervisor.h"

namespace gpufleet::bindings {

using namespace gpufleet::dispatch;

namespace {

OutputMode parse_output(const std::string& s) {
  if (s == "files") return OutputMode::File;
  if (s == "prefix") return OutputMode::Pipe;
  if (s == "inherit") return OutputMode::Inherit;
  if (s == "null") return OutputMode::Null;
  throw std::invalid_argument("output must be 'files', 'prefix', 'inherit' or 'null', got '" + s + "'");
}

const char* kind_name(EventKind k) {
  switch (k) {
    case EventKind::Started: return "started";
    case EventKind::Finished: return "finished";
    case EventKind::Skipped: return "skipped";
    case EventKind::NotStarted: return "not_started";
    case EventKind::Message: return "message";
  }
  return "?";
}

struct PyDispatcher {
  std::unique_ptr<Dispatcher> d;  // dropped when run() returns (see "run" below)
  std::string run_id, marker;
};

// Names, paths and argv words are bytes on Linux. The Python layer passes them as bytes
// (os.fsencode); they come back as str with surrogateescape, the way os.fsdecode gives them, so that
// a file name that is not UTF-8 round-trips instead of failing pybind11's strict decoding.
py::str fs_str(const std::string& s) {
  return py::reinterpret_steal<py::str>(
      PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape"));
}
// Messages are read, not reused: undecodable bytes shown as \xNN.
py::str text_str(const std::string& s) {
  return py::reinterpret_steal<py::str>(
      PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "backslashreplace"));
}

}  // namespace

void bind_dispatch(py::module_& m) {
  py::class_<TaskSpec>(m, "TaskSpec")
      .def(py::init([](std::int64_t seq, std::string key, std::string name, std::vector<std::string> argv,
                       std::vector<std::pair<std::string, std::string>> env, std::string cwd,
                       std::vector<std::pair<std::string, std::string>> outputs, int gpus,
                       std::uint64_t min_free_memory, double timeout, int retries, int affinity, int first_attempt) {
             TaskSpec t;
             t.seq = seq;
             t.key = std::move(key);
             t.name = std::move(name);
             t.argv = std::move(argv);
             t.env = std::move(env);
             t.cwd = std::move(cwd);
             for (auto& o : outputs) t.outputs.push_back({std::move(o.first), std::move(o.second)});
             t.gpus = gpus;
             t.min_free_memory = min_free_memory;
             t.timeout_s = timeout;
             t.retries = retries;
             t.affinity = affinity;
             t.first_attempt = first_attempt;
             return t;
           }),
           py::arg("seq"), py::arg("key"), py::arg("name"), py::arg("argv"), py::arg("env"), py::arg("cwd"),
           py::arg("outputs"), py::arg("gpus"), py::arg("min_free_memory"), py::arg("timeout"), py::arg("retries"),
           py::arg("affinity"), py::arg("first_attempt") = 1)
      .def_readonly("seq", &TaskSpec::seq)
      .def_property_readonly("name", [](const TaskSpec& t) { return fs_str(t.name); })
      .def_property_readonly("argv", [](const TaskSpec& t) {
        py::list out;
        for (const auto& a : t.argv) out.append(fs_str(a));
        return out;
      });

  py::class_<TaskEvent>(m, "TaskEvent")
      .def_property_readonly("kind", [](const TaskEvent& e) { return kind_name(e.kind); })
      .def_readonly("seq", &TaskEvent::seq)
      .def_property_readonly("name", [](const TaskEvent& e) { return fs_str(e.name); })
      .def_readonly("attempt", &TaskEvent::attempt)
      .def_readonly("devices", &TaskEvent::devices)
      .def_readonly("slot", &TaskEvent::slot)
      .def_readonly("start", &TaskEvent::start)
      .def_readonly("end", &TaskEvent::end)
      .def_property_readonly("status", [](const TaskEvent& e) { return status_name(e.status); })
      .def_readonly("exit_code", &TaskEvent::exit_code)
      .def_readonly("signal", &TaskEvent::signal)
      .def_readonly("final", &TaskEvent::final)
      .def_property_readonly("log_path", [](const TaskEvent& e) { return fs_str(e.log_path); })
      .def_property_readonly("message", [](const TaskEvent& e) { return text_str(e.message); })
      .def_readonly("pid", &TaskEvent::pid);

  py::class_<PoolDevice>(m, "PoolDevice")
      .def_readonly("ordinal", &PoolDevice::ordinal)
      .def_readonly("physical_index", &PoolDevice::physical_index)
      .def_readonly("visible_id", &PoolDevice::visible_id)
      .def_readonly("name", &PoolDevice::name);
  m.def("make_pool", &make_pool, py::arg("ordinals"));

  py::class_<PyDispatcher>(m, "Dispatcher")
      .def(py::init([](std::vector<int> ordinals, int slots_per_device, int cpu_slots, int quarantine_after,
                       double kill_grace, double retry_backoff, const std::string& output, std::string log_dir,
                       std::string journal, bool resume, bool skip_existing, std::size_t lookahead,
                       double memory_poll, double event_interval, std::string description, py::function pull,
                       py::function on_events, int wake_fd, py::object memory, bool keep_open,
                       std::string run_id) {
             DispatchOptions o;
             o.devices = make_pool(ordinals);
             o.slots_per_device = slots_per_device;
             o.cpu_slots = cpu_slots;
             o.quarantine_after = quarantine_after;
             o.kill_grace_s = kill_grace;
             o.retry_backoff_s = retry_backoff;
             o.output = parse_output(output);
             o.log_dir = std::move(log_dir);
             o.journal_path = std::move(journal);
             o.resume = resume;
             o.skip_existing = skip_existing;
             o.lookahead = lookahead;
             o.memory_poll_s = memory_poll;
             o.event_interval_s = event_interval;
             o.description = std::move(description);
             o.keep_open = keep_open;
             o.run_id = std::move(run_id);
             auto self = std::make_unique<PyDispatcher>();
             PyDispatcher* raw = self.get();
             DispatchHooks h;
             // The hooks run on the dispatcher's thread with the GIL released; each takes it briefly.
             h.pull = [pull](std::size_t max) {
               py::gil_scoped_acquire gil;
               return pull(max).cast<std::vector<TaskSpec>>();
             };
             h.on_events = [on_events](std::vector<TaskEvent>& evs) {
               py::gil_scoped_acquire gil;
               on_events(py::cast(evs));
             };
             h.check_interrupt = [raw] {
               py::gil_scoped_acquire gil;
               if (PyErr_CheckSignals() != 0) {
                 if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                   PyErr_Clear();
                   raw->d->interrupt();
                 } else {
                   throw py::error_already_set();
                 }
               }
             };
             if (!memory.is_none()) {
               h.memory = [memory] {
                 py::gil_scoped_acquire gil;
                 std::vector<MemoryReading> out;
                 for (auto item : memory()) {
                   auto pr = item.cast<std::pair<std::optional<std::uint64_t>, std::optional<std::uint64_t>>>();
                   out.push_back({pr.first, pr.second});
                 }
                 return out;
               };
             }
             h.wake_fd = wake_fd;
             self->d = std::make_unique<Dispatcher>(std::move(o), std::move(h));
             self->run_id = self->d->run_id();
             self->marker = self->d->marker();
             return self;
           }),
           py::arg("devices"), py::arg("slots_per_device"), py::arg("cpu_slots"), py::arg("quarantine_after"),
           py::arg("kill_grace"), py::arg("retry_backoff"), py::arg("output"), py::arg("log_dir"), py::arg("journal"),
           py::arg("resume"), py::arg("skip_existing"), py::arg("lookahead"), py::arg("memory_poll"),
           py::arg("event_interval"), py::arg("description"), py::arg("pull"), py::arg("on_events"),
           py::arg("wake_fd") = -1, py::arg("memory") = py::none(), py::arg("keep_open") = false,
           py::arg("run_id") = "")
      .def("run",
           [](PyDispatcher& self) {
             if (!self.d) throw std::logic_error("a Dispatcher runs once");
             RunTotals t;
             // The hooks hold the Python callbacks, which usually reference this object: a cycle
             // through C++ that Python's collector cannot see. Dropping the Dispatcher (with the GIL,
             // since that releases Python objects) as soon as the run ends breaks it, so the run's
             // descriptors (wake pipe, and the journal it already closed) go now, not never.
             try {
               py::gil_scoped_release nogil;
               t = self.d->run();
             } catch (...) {
               self.d.reset();
               throw;
             }
             self.d.reset();
             py::dict out;
             out["succeeded"] = t.succeeded;
             out["failed"] = t.failed;
             out["skipped"] = t.skipped;
             out["not_started"] = t.not_started;
             out["attempts"] = t.attempts;
             out["drained"] = t.drained;
             out["cancelled"] = t.cancelled;
             out["quarantined"] = t.quarantined;
             out["run_id"] = t.run_id;
             return out;
           })
      .def("interrupt", [](PyDispatcher& self) { if (self.d) self.d->interrupt(); })
      .def("drain", [](PyDispatcher& self) { if (self.d) self.d->drain(); })
      .def("cancel", [](PyDispatcher& self) { if (self.d) self.d->cancel(); })
      // Note [Open input] in dispatch/scheduler.cpp: the queue daemon's hooks (thread-safe, any thread)
      .def("notify_input", [](PyDispatcher& self) { if (self.d) self.d->notify_input(); })
      .def("close_input", [](PyDispatcher& self) { if (self.d) self.d->close_input(); })
      .def("cancel_task", [](PyDispatcher& self, std::int64_t seq) { if (self.d) self.d->cancel_task(seq); },
           py::arg("seq"))
      // (gpu slots, gpu devices with a free slot, cpu slots): from the pull hook only (the loop's thread)
      .def("free_slots",
           [](PyDispatcher& self) {
             if (!self.d) return std::make_tuple(0, 0, 0);
             auto f = self.d->free_slots();
             return std::make_tuple(f.gpu_slots, f.gpu_devices, f.cpu_slots);
           })
      .def_property_readonly("run_id", [](PyDispatcher& self) { return self.run_id; })
      .def_property_readonly("marker", [](PyDispatcher& self) { return self.marker; });

  // The executor and spawn launcher own their processes in Python (multiprocessing) but share the
  // same reaper: see Note [No process outlives the dispatcher] in dispatch/supervisor.cpp.
  py::class_<Supervisor>(m, "Supervisor")
      .def(py::init<std::string, double>(), py::arg("marker"), py::arg("grace"))
      .def("track", &Supervisor::track, py::arg("pgid"))
      .def("untrack", &Supervisor::untrack, py::arg("pgid"))
      .def("close", &Supervisor::close)
      // Note [No process outlives the dispatcher]: an owner that watches its supervisor (pidfd readable,
      // or lost() polled) replaces a killed one with restart(), which returns the message to show.
      .def("lost", &Supervisor::lost)
      .def("restart", &Supervisor::restart)
      .def_property_readonly("pidfd", &Supervisor::pidfd)
      .def_property_readonly("pid", &Supervisor::pid)
      .def_property_readonly("marker", &Supervisor::marker);
  // Creates (or checks) a journal file without a run: the queue daemon adds its own tables beside it.
  m.def("init_journal", [](const std::string& path) { Journal j(path); }, py::arg("path"));
  m.def("random_token", &random_token);
  m.def("kill_marked_processes", &kill_marked_processes, py::arg("marker"), py::arg("signal"));
}

}  // namespace gpufleet::bindings
