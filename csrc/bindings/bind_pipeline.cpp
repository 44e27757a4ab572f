// Bindings for csrc/pipeline: bounded queues of Python objects, worker clocks, stage statistics,
// the sampling monitor. The Python layer (gpufleet/_pipeline.py) wires stages and calls user code.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <memory>

#include "bindings/bindings.h"
#include "common/error.h"
#include "pipeline/bounded_queue.h"
#include "pipeline/clock.h"
#include "pipeline/stage_stats.h"

namespace gpufleet::bindings {

namespace {

using pipeline::BoundedQueue;
using pipeline::Monitor;
using pipeline::QueueStatus;
using pipeline::StageStats;
using pipeline::WorkerClock;
using pipeline::WorkerState;

// Leaked on purpose: exception types live as long as the interpreter.
PyObject* queue_closed_type = nullptr;
PyObject* queue_cancelled_type = nullptr;

// Note [Python objects in a C++ queue]: the queue holds owned PyObject* references. A reference is
// taken with the GIL held before the put and handed back (stolen) by the get; nothing inside the
// queue touches reference counts, so it may run with the GIL released. Items left behind by a
// cancelled run are released by drain()/the destructor, which run with the GIL held.
class PyQueue {
 public:
  explicit PyQueue(std::size_t capacity) : q_(std::make_shared<BoundedQueue<PyObject*>>(capacity)) {}
  ~PyQueue() {
    for (PyObject* p : q_->drain()) Py_XDECREF(p);
  }
  PyQueue(const PyQueue&) = delete;
  PyQueue& operator=(const PyQueue&) = delete;

  void put(py::object obj, WorkerClock* clock, std::optional<double> timeout) {
    PyObject* p = obj.release().ptr();  // our reference now
    QueueStatus s = q_->try_put(p);
    if (s == QueueStatus::WouldBlock) {
      py::gil_scoped_release nogil;
      s = q_->put(p, clock, timeout.value_or(-1));
    }
    if (s != QueueStatus::Ok) {
      Py_DECREF(p);
      raise(s);
    }
  }

  py::object get(WorkerClock* clock, std::optional<double> timeout) {
    PyObject* p = nullptr;
    QueueStatus s = q_->try_get(p);
    if (s == QueueStatus::WouldBlock) {
      py::gil_scoped_release nogil;
      s = q_->get(p, clock, timeout.value_or(-1));
    }
    if (s != QueueStatus::Ok) raise(s);
    return py::reinterpret_steal<py::object>(p);
  }

  py::list drain() {
    py::list out;
    for (PyObject* p : q_->drain()) out.append(py::reinterpret_steal<py::object>(p));
    return out;
  }

  BoundedQueue<PyObject*>& core() { return *q_; }
  std::shared_ptr<BoundedQueue<PyObject*>> shared() { return q_; }

 private:
  [[noreturn]] static void raise(QueueStatus s) {
    switch (s) {
      case QueueStatus::Closed: PyErr_SetString(queue_closed_type, "the queue is closed"); break;
      case QueueStatus::Cancelled: PyErr_SetString(queue_cancelled_type, "the pipeline was cancelled"); break;
      case QueueStatus::Timeout: PyErr_SetString(PyExc_TimeoutError, "timed out waiting on the queue"); break;
      default: PyErr_SetString(PyExc_RuntimeError, "unexpected queue status"); break;
    }
    throw py::error_already_set();
  }

  std::shared_ptr<BoundedQueue<PyObject*>> q_;
};

WorkerState parse_state(const std::string& s) {
  if (s == "busy") return WorkerState::Busy;
  if (s == "starved") return WorkerState::Starved;
  if (s == "blocked") return WorkerState::Blocked;
  throw std::invalid_argument(fmt::format("unknown worker state '{}': expected 'busy', 'starved' or 'blocked'", s));
}

py::dict totals_dict(const pipeline::WorkerTotals& t) {
  py::dict d;
  d["busy_s"] = t.busy_ns * 1e-9;
  d["starved_s"] = t.starved_ns * 1e-9;
  d["blocked_s"] = t.blocked_ns * 1e-9;
  d["wall_s"] = t.wall_ns() * 1e-9;
  d["start_ns"] = t.start_ns;
  d["end_ns"] = t.end_ns;
  d["state"] = pipeline::worker_state_name(t.state);
  return d;
}

std::optional<double> check_timeout(std::optional<double> timeout) {
  GF_CHECK_ARG(!timeout || *timeout >= 0, "timeout must be None or non-negative seconds, got {}", *timeout);
  return timeout;
}

}  // namespace

void bind_pipeline(py::module_& m) {
  py::module_ pm = m.def_submodule("pipeline", "Pipeline core: bounded queues, worker clocks, stage statistics");
  queue_closed_type = PyErr_NewExceptionWithDoc(
      "gpufleet._core.pipeline.QueueClosed", "The queue is closed and empty: the upstream stages have finished.",
      nullptr, nullptr);
  queue_cancelled_type = PyErr_NewExceptionWithDoc(
      "gpufleet._core.pipeline.QueueCancelled", "The pipeline was cancelled (Ctrl-C or a failing stage).", nullptr,
      nullptr);
  if (!queue_closed_type || !queue_cancelled_type) throw py::error_already_set();
  pm.attr("QueueClosed") = py::handle(queue_closed_type);
  pm.attr("QueueCancelled") = py::handle(queue_cancelled_type);

  pm.def("now_ns", &pipeline::now_ns, "Nanoseconds on the monotonic clock the pipeline statistics use.");

  py::class_<WorkerClock>(pm, "WorkerClock", "Time accounting of one worker: busy, starved, blocked.")
      .def(py::init<std::size_t>(), py::arg("max_spans") = 20000)
      .def("start", &WorkerClock::start)
      .def("finish", &WorkerClock::finish)
      .def("switch_to", [](WorkerClock& c, const std::string& s) { c.switch_to(parse_state(s)); }, py::arg("state"))
      .def("totals", [](const WorkerClock& c) { return totals_dict(c.totals()); })
      .def_property_readonly("state", [](const WorkerClock& c) { return pipeline::worker_state_name(c.state()); })
      .def("spans",
           [](const WorkerClock& c) {
             py::list out;
             for (const auto& s : c.spans())
               out.append(py::make_tuple(pipeline::worker_state_name(s.state), s.start_ns, s.duration_ns));
             return out;
           })
      .def_property_readonly("dropped_spans", &WorkerClock::dropped_spans);

  py::class_<PyQueue>(pm, "Queue", "A bounded queue of Python objects; blocking waits release the GIL.")
      .def(py::init([](long long capacity) {
             GF_CHECK_ARG(capacity >= 1, "queue capacity must be at least 1, got {}", capacity);
             return std::make_unique<PyQueue>(static_cast<std::size_t>(capacity));
           }),
           py::arg("capacity"))
      .def("put",
           [](PyQueue& q, py::object obj, WorkerClock* clock, std::optional<double> timeout) {
             q.put(std::move(obj), clock, check_timeout(timeout));
           },
           py::arg("item"), py::arg("clock") = nullptr, py::arg("timeout") = py::none(),
           "Puts an item, waiting for room (charged to `clock` as blocked). Raises QueueClosed, "
           "QueueCancelled or TimeoutError.")
      .def("get",
           [](PyQueue& q, WorkerClock* clock, std::optional<double> timeout) {
             return q.get(clock, check_timeout(timeout));
           },
           py::arg("clock") = nullptr, py::arg("timeout") = py::none(),
           "Takes the next item, waiting for one (charged to `clock` as starved). Raises QueueClosed once "
           "closed and empty, QueueCancelled, or TimeoutError.")
      .def("set_producers", [](PyQueue& q, int n) { q.core().set_producers(n); }, py::arg("n"))
      .def("producer_done", [](PyQueue& q) { return q.core().producer_done(); })
      .def("close", [](PyQueue& q) { q.core().close(); })
      .def("cancel", [](PyQueue& q) { q.core().cancel(); })
      .def("drain", &PyQueue::drain)
      .def_property_readonly("capacity", [](PyQueue& q) { return q.core().capacity(); })
      .def_property_readonly("closed", [](PyQueue& q) { return q.core().closed(); })
      .def_property_readonly("cancelled", [](PyQueue& q) { return q.core().cancelled(); })
      .def_property_readonly("high_water", [](PyQueue& q) { return q.core().high_water(); })
      .def_property_readonly("total_put", [](PyQueue& q) { return q.core().total_put(); })
      .def_property_readonly("total_got", [](PyQueue& q) { return q.core().total_got(); })
      .def("__len__", [](PyQueue& q) { return q.core().size(); });

  py::class_<StageStats, std::shared_ptr<StageStats>>(pm, "StageStats", "Counters of one stage.")
      .def(py::init<std::string, int, std::size_t>(), py::arg("name"), py::arg("workers"),
           py::arg("max_spans_per_worker") = 20000)
      .def_property_readonly("name", &StageStats::name)
      .def_property_readonly("workers", &StageStats::workers)
      .def("clock", py::overload_cast<int>(&StageStats::clock), py::arg("worker"), py::return_value_policy::reference_internal)
      .def("add_items_in", &StageStats::add_items_in, py::arg("n") = 1)
      .def("add_items_out", &StageStats::add_items_out, py::arg("n") = 1)
      .def("add_batch", &StageStats::add_batch, py::arg("size"))
      .def("add_errors", &StageStats::add_errors, py::arg("n") = 1)
      .def_property_readonly("items_in", &StageStats::items_in)
      .def_property_readonly("items_out", &StageStats::items_out)
      .def_property_readonly("batches", &StageStats::batches)
      .def_property_readonly("batch_items", &StageStats::batch_items)
      .def_property_readonly("errors", &StageStats::errors)
      .def_property_readonly("mean_batch_size", &StageStats::mean_batch_size)
      .def("totals", [](const StageStats& s) { return totals_dict(s.totals()); })
      .def("utilization", &StageStats::utilization);

  pm.def(
      "limiting_stage",
      [](const std::vector<std::shared_ptr<StageStats>>& stages) {
        std::vector<const StageStats*> raw;
        for (const auto& s : stages) raw.push_back(s.get());
        return pipeline::limiting_stage(raw);
      },
      py::arg("stages"), "Index of the stage whose workers were busiest (-1 if none ran).");

  py::class_<Monitor>(pm, "Monitor", "Samples queue depths and stage counters on a C++ thread.")
      .def(py::init<double, std::size_t>(), py::arg("interval") = 0.05, py::arg("max_samples") = 4096)
      .def("add_queue",
           [](Monitor& mon, const std::string& name, PyQueue& q) {
             auto core = q.shared();
             return mon.add_probe(name, [core] { return static_cast<double>(core->size()); });
           },
           py::arg("name"), py::arg("queue"))
      .def("add_stage",
           [](Monitor& mon, std::shared_ptr<StageStats> s) {
             mon.add_probe(s->name() + ".items_out", [s] { return static_cast<double>(s->items_out()); });
             mon.add_probe(s->name() + ".busy_s", [s] { return s->totals().busy_ns * 1e-9; });
           },
           py::arg("stage"), "Adds two probes: '<name>.items_out' and '<name>.busy_s'.")
      .def("start", &Monitor::start)
      .def("stop", &Monitor::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("names", &Monitor::names)
      .def_property_readonly("interval", &Monitor::interval_s)
      .def_property_readonly("start_ns", &Monitor::start_ns)
      .def("samples", [](const Monitor& mon) {
        py::list times, rows;
        for (const auto& s : mon.samples()) {
          times.append(s.t_s);
          rows.append(py::cast(s.values));
        }
        return py::make_tuple(times, rows);
      });
}

}  // namespace gpufleet::bindings
