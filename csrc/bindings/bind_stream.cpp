// Bindings for the current CUDA device, streams, events and memory (allocator stats, empty_cache):
// part of bind_tensor (tensor_bindings.h).
#include <pybind11/stl.h>

#include "bindings/tensor_bindings.h"
#include "common/error.h"
#include "tensor/allocator.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"
#if GPUFLEET_WITH_CUDA
#include "kernels/device_memory.h"
#endif

namespace gpufleet::bindings {

namespace {

py::dict stats_dict(const AllocatorStats& s) {
  py::dict d;
  d["allocated_bytes"] = s.allocated_bytes;
  d["peak_allocated_bytes"] = s.peak_allocated_bytes;
  d["reserved_bytes"] = s.reserved_bytes;
  d["peak_reserved_bytes"] = s.peak_reserved_bytes;
  d["cached_bytes"] = s.cached_bytes;
  d["num_allocs"] = s.num_allocs;
  d["num_frees"] = s.num_frees;
  d["num_cache_hits"] = s.num_cache_hits;
  d["num_raw_allocs"] = s.num_raw_allocs;
  d["num_raw_frees"] = s.num_raw_frees;
  d["num_oom_retries"] = s.num_oom_retries;
  d["num_raw_free_failures"] = s.num_raw_free_failures;
  d["active_blocks"] = s.active_blocks;
  d["cached_blocks"] = s.cached_blocks;
  d["pending_blocks"] = s.pending_blocks;
  d["pending_bytes"] = s.pending_bytes;
  return d;
}

}  // namespace

void bind_tensor_streams(py::module_& m) {
  // ---- current device, streams, events -------------------------------------------------------
  m.def("_set_device_index", &set_current_cuda_index, py::arg("index"));
  m.def("_current_device_index", &current_cuda_index);

  // Both classes are registered before their methods, which name each other: a signature is written
  // when its method is defined, and a type not yet registered would show as its C++ name (the stubs).
  py::class_<Stream> stream_class(m, "Stream", "A CUDA stream. Stream(device=None, priority=0) creates a new one.");
  py::class_<Event> event_class(m, "Event", "A CUDA event: record it on a stream, wait for it, time between two.");
  stream_class
      .def(py::init([](py::handle device, int priority) {
             return Stream::create(cuda_index_from_py(device, "Stream"), priority);
           }), py::arg("device") = py::none(), py::arg("priority") = 0)
      .def_property_readonly("device", [](const Stream& s) { return Device::cuda(s.device()); })
      .def_property_readonly("cuda_stream", &Stream::handle, "The cudaStream_t as an int (0: the default stream).")
      .def("synchronize", &Stream::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &Stream::query)
      .def("wait_stream", &Stream::wait_stream, py::arg("stream"))
      .def("wait_event", [](const Stream& s, const Event& e) { e.wait(s); }, py::arg("event"))
      .def("record_event", [](const Stream& s, std::optional<Event> e) {
             Event ev = e.value_or(Event(false));
             ev.record(s);
             return ev;
           }, py::arg("event") = py::none())
      .def("__eq__", [](const Stream& a, py::handle b) { return py::isinstance<Stream>(b) && a == b.cast<const Stream&>(); })
      .def("__hash__", [](const Stream& s) { return std::hash<std::uintptr_t>()(s.handle() * 31 + s.device()); })
      .def("__repr__", [](const Stream& s) {
        return fmt::format("<gpufleet.Stream device=cuda:{} cuda_stream={:#x}>", s.device(), s.handle());
      });

  event_class
      .def(py::init<bool>(), py::arg("enable_timing") = false)
      .def("record", [](Event& e, std::optional<Stream> s) { e.record(s.value_or(current_stream(current_cuda_index()))); },
           py::arg("stream") = py::none())
      .def("synchronize", &Event::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &Event::query)
      .def("wait", [](const Event& e, std::optional<Stream> s) { e.wait(s.value_or(current_stream(current_cuda_index()))); },
           py::arg("stream") = py::none())
      .def("elapsed_time", &Event::elapsed_ms, py::arg("end_event"), "Milliseconds from this event to end_event.")
      .def_property_readonly("recorded", &Event::recorded);

  m.def("current_stream", [](py::handle device) { return current_stream(cuda_index_from_py(device, "current_stream")); },
        py::arg("device") = py::none());
  m.def("default_stream", [](py::handle device) { return Stream::default_stream(cuda_index_from_py(device, "default_stream")); },
        py::arg("device") = py::none());
  m.def("_set_current_stream", &set_current_stream, py::arg("stream"));
  m.def("synchronize", [](py::handle device) {
        if (!device.is_none() && device_from_py(device).is_cpu()) return;  // nothing queued on the host
        const int idx = cuda_index_from_py(device, "synchronize");
        py::gil_scoped_release nogil;
        synchronize_device(idx);
      }, py::arg("device") = py::none(), "Waits for all work queued on a CUDA device (the current one by default).");

  // ---- memory ---------------------------------------------------------------------------------
  m.def("memory_stats", [](py::handle device) {
        if (!device.is_none() && device_from_py(device).is_cpu()) return stats_dict(pinned_memory_stats());
        return stats_dict(device_memory_stats(cuda_index_from_py(device, "memory_stats")));
      }, py::arg("device") = py::none(),
      "The caching allocator's counters for a CUDA device, or for the pinned host pool with device='cpu'.");
  m.def("empty_cache", [] {
        empty_all_caches();
#if GPUFLEET_WITH_CUDA
        kernels::trim_kernel_memory();
#endif
      }, py::call_guard<py::gil_scoped_release>(),
        "Releases every cached (unused) block of the device allocators and the pinned pool, and trims the "
        "kernels' memory pools.");
  m.def("_inject_cuda_free_failures", [](int count, int after) {
#if GPUFLEET_WITH_CUDA
        cuda_backend::inject_device_free_failures(count, after);
#else
        (void)count, (void)after;
        throw_no_cuda("cudaFree failures can only be injected into a CUDA build");
#endif
      }, py::arg("count"), py::arg("after") = 0,
      "Test hook: after `after` successful cudaFree calls of the device allocators, the next `count` fail.");
  m.def("reset_peak_memory_stats", [](py::handle device) {
        if (!device.is_none() && device_from_py(device).is_cpu()) return pinned_allocator().reset_peak_stats();
        device_allocator(cuda_index_from_py(device, "reset_peak_memory_stats")).reset_peak_stats();
      }, py::arg("device") = py::none());
}

}  // namespace gpufleet::bindings
