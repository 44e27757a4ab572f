// Bindings for csrc/device: Device, DeviceInfo, discovery, selection, simulation, seeding.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "common/error.h"
#include "common/units.h"
#include "device/discovery.h"
#include "device/random.h"
#include "device/select.h"
#include "device/simulated.h"
#include "device/visible_devices.h"

namespace gpufleet::bindings {

namespace {

// Note [Rich display] (gpufleet/_display.py): how a device or the topology shows itself in a REPL or
// a notebook is written once, in Python, for these C++ classes and the Python reports alike.
std::string display(const char* fn, py::object arg) {
  return py::module_::import("gpufleet._display").attr(fn)(arg).cast<std::string>();
}
SelectOptions select_options(int n, std::optional<std::uint64_t> min_free_memory,
                             std::optional<double> max_utilization, const std::string& order,
                             std::vector<int> exclude) {
  SelectOptions o;
  o.n = n;
  o.min_free_memory = min_free_memory;
  o.max_utilization = max_utilization;
  o.order = parse_select_order(order);
  o.exclude = std::move(exclude);
  return o;
}

constexpr const char* kAcceptedObjects =
    "a gpufleet.Device, a string such as 'cpu' or 'cuda:1', an int N meaning 'cuda:N', or an object "
    "with .type and .index such as torch.device";

// A device index from Python, checked the same way wherever it comes from (an int, the index of
// Device(type, index), a torch.device's .index): torch's "must not be negative", and no Python int is
// ever too large for a pybind cast (ValueError, not the TypeError of a failed conversion).
int device_index(py::handle obj) {
  GF_CHECK_TYPE(PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr()),
                "Device index must be an int or None, got {}", py::repr(obj).cast<std::string>());
  int overflow = 0;
  const long long i = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  const bool negative = overflow < 0 || (overflow == 0 && i < 0);
  GF_CHECK_ARG(!negative, "Device index must not be negative, got {}", py::str(obj).cast<std::string>());
  GF_CHECK_ARG(overflow == 0 && i < (1LL << 30), "invalid device index {}: expected a non-negative integer below 1073741824 (2**30)",
               py::str(obj).cast<std::string>());
  return static_cast<int>(i);
}
}

Device device_from_py(py::handle obj) {
  if (py::isinstance<Device>(obj)) return obj.cast<Device>();
  if (py::isinstance<py::str>(obj)) return Device::parse(obj.cast<std::string>());
  if (py::isinstance<DeviceInfo>(obj)) return obj.cast<const DeviceInfo&>().device();
  if (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) return Device::cuda(device_index(obj));
  if (py::hasattr(obj, "type") && py::hasattr(obj, "index")) {
    py::object type = obj.attr("type"), index = obj.attr("index");
    GF_CHECK_TYPE(py::isinstance<py::str>(type), "device object {} has a non-string .type; expected {}",
                  py::repr(obj).cast<std::string>(), kAcceptedObjects);
    Device d = Device::parse(type.cast<std::string>());
    if (!index.is_none()) d = Device(d.type, device_index(index));
    return d;
  }
  throw TypeError_(fmt::format("expected a device, got {} of type {}; accepted: {}",
                               py::repr(obj).cast<std::string>(),
                               py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>(), kAcceptedObjects));
}

void bind_device(py::module_& m) {
  py::class_<Device>(m, "Device", "A device: 'cpu', 'cuda' (the current CUDA device) or 'cuda:N'.")
      .def(py::init([](py::object obj) { return device_from_py(obj); }), py::arg("device"))
      .def(py::init([](const std::string& type, py::object index) {
             Device d = Device::parse(type);
             if (index.is_none()) return d;
             const int i = device_index(index);
             GF_CHECK_ARG(!d.has_index(), "Device('{}', {}): the type string already has an index", type, i);
             return Device(d.type, i);
           }),
           py::arg("type"), py::arg("index"))
      .def_property_readonly("type", [](const Device& d) { return std::string(device_type_name(d.type)); })
      .def_property_readonly("index", [](const Device& d) -> std::optional<int> {
        return d.has_index() ? std::optional<int>(d.index) : std::nullopt;
      })
      .def("__str__", &Device::str)
      .def("__repr__",
           [](const Device& d) {
             return d.has_index() ? fmt::format("device(type='{}', index={})", device_type_name(d.type), d.index)
                                  : fmt::format("device(type='{}')", device_type_name(d.type));
           })
      // Equal to Devices only, as torch.device: Device('cuda:1') != 'cuda:1' (compare str(d) for that)
      .def("__eq__",
           [](const Device& a, py::object b) -> py::object {
             if (!py::isinstance<Device>(b)) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
             return py::bool_(a == b.cast<Device>());
           })
      .def("__hash__", [](const Device& d) { return std::hash<Device>()(d); })
      .def(py::pickle([](const Device& d) { return d.str(); },
                      [](const std::string& s) { return Device::parse(s); }));

  m.def("as_device", [](py::object obj) { return device_from_py(obj); }, py::arg("device"),
        "Converts anything gpufleet accepts as a device to a gpufleet.Device.");

  py::class_<GpuProcess>(m, "GpuProcess")
      .def_readonly("pid", &GpuProcess::pid)
      .def_readonly("used_memory", &GpuProcess::used_memory)
      .def("__repr__", [](const GpuProcess& p) {
        return fmt::format("GpuProcess(pid={}, used_memory={})", p.pid,
                           p.used_memory ? std::to_string(*p.used_memory) : "None");
      });

  py::class_<DeviceInfo>(m, "DeviceInfo", "What discovery knows of one GPU; unknown fields are None.")
      .def_readonly("ordinal", &DeviceInfo::ordinal)
      .def_readonly("nvml_index", &DeviceInfo::nvml_index)
      .def_readonly("name", &DeviceInfo::name)
      .def_readonly("uuid", &DeviceInfo::uuid)
      .def_readonly("pci_bus_id", &DeviceInfo::pci_bus_id)
      .def_readonly("mig_uuid", &DeviceInfo::mig_uuid)
      .def_readonly("compute_capability", &DeviceInfo::compute_capability)
      .def_readonly("total_memory", &DeviceInfo::total_memory)
      .def_readonly("free_memory", &DeviceInfo::free_memory)
      .def_readonly("used_memory", &DeviceInfo::used_memory)
      .def_readonly("utilization", &DeviceInfo::utilization)
      .def_readonly("processes", &DeviceInfo::processes)
      .def_property_readonly("num_processes",
                             [](const DeviceInfo& d) -> std::optional<int> {
                               if (!d.processes) return std::nullopt;
                               return static_cast<int>(d.processes->size());
                             })
      .def_readonly("source", &DeviceInfo::source)
      .def_property_readonly("unknown_fields", &DeviceInfo::unknown_fields)
      .def_property_readonly("device", &DeviceInfo::device)
      .def("__repr__", [](const DeviceInfo& d) {
        return fmt::format("DeviceInfo(ordinal={}, nvml_index={}, name='{}', free_memory={}, utilization={}, source='{}')",
                           d.ordinal, d.nvml_index, d.name,
                           d.free_memory ? format_memory_size(*d.free_memory) : "None",
                           d.utilization ? std::to_string(*d.utilization) : "None", d.source);
      })
      .def("_repr_html_", [](py::object self) { return display("devices_html", py::make_tuple(self)); },
           "The device as an HTML table row (Jupyter shows it; Note [Rich display] in gpufleet/_display.py).");

  py::class_<Topology>(m, "Topology")
      .def_readonly("source", &Topology::source)
      .def_readonly("gpus", &Topology::gpus)
      .def_readonly("visible", &Topology::visible)
      .def_readonly("cuda_visible_devices", &Topology::cuda_visible_devices)
      .def_readonly("device_order", &Topology::device_order)
      .def_readonly("ordinal_order_exact", &Topology::ordinal_order_exact)
      .def_readonly("driver_version", &Topology::driver_version)
      .def_readonly("cuda_driver_version", &Topology::cuda_driver_version)
      .def_readonly("notes", &Topology::notes)
      .def("visible_devices", &Topology::visible_devices)
      .def("__repr__", [](py::object self) { return display("topology_repr", self); },
           "A summary line and the `gpufleet info` table of every GPU.")
      .def("_repr_html_", [](py::object self) { return display("topology_html", self); },
           "The same as an HTML table (Jupyter shows it).");

  py::class_<BuildInfo>(m, "BuildInfo")
      .def_readonly("cuda", &BuildInfo::cuda)
      .def_readonly("cuda_architectures", &BuildInfo::cuda_architectures)
      .def_readonly("cuda_runtime_version", &BuildInfo::cuda_runtime_version);

  m.def("discover", [] {
    py::gil_scoped_release nogil;
    return discover();
  });
  m.def("devices", [] {
    py::gil_scoped_release nogil;
    return devices();
  });
  m.def("device_count", [] {
    py::gil_scoped_release nogil;
    return device_count();
  });
  m.def("build_info", &build_info);
  m.def("pci_bus_key", &pci_bus_key);

  m.def(
      "parse_visible_devices",
      [](std::optional<std::string> value, const std::vector<std::string>& uuids,
         const std::vector<std::vector<std::string>>& mig_uuids) {
        std::vector<GpuIdentity> gpus;
        for (std::size_t i = 0; i < uuids.size(); ++i)
          gpus.push_back({uuids[i], i < mig_uuids.size() ? mig_uuids[i] : std::vector<std::string>{}});
        std::vector<std::pair<int, std::string>> out;
        for (const auto& v : parse_visible_devices(value, gpus)) out.emplace_back(v.gpu, v.mig_uuid);
        return out;
      },
      py::arg("value"), py::arg("uuids"), py::arg("mig_uuids") = std::vector<std::vector<std::string>>{});

  m.def("parse_memory_size", &parse_memory_size, py::arg("text"));
  m.def("format_memory_size", &format_memory_size, py::arg("bytes"));

  m.def(
      "select_devices",
      [](int n, std::optional<std::uint64_t> min_free_memory, std::optional<double> max_utilization,
         const std::string& order, std::vector<int> exclude, bool wait, std::optional<double> timeout,
         double poll_interval) {
        SelectOptions o = select_options(n, min_free_memory, max_utilization, order, std::move(exclude));
        o.wait = wait;
        o.timeout_s = timeout;
        o.poll_interval_s = poll_interval;
        py::gil_scoped_release nogil;
        return select_devices(o, &check_python_signals);
      },
      py::arg("n"), py::arg("min_free_memory"), py::arg("max_utilization"), py::arg("order"),
      py::arg("exclude"), py::arg("wait"), py::arg("timeout"), py::arg("poll_interval"));

  m.def(
      "explain_selection",
      [](int n, std::optional<std::uint64_t> min_free_memory, std::optional<double> max_utilization,
         const std::string& order, std::vector<int> exclude) {
        const SelectOptions o = select_options(n, min_free_memory, max_utilization, order, std::move(exclude));
        Selection sel = evaluate_selection(devices(), o);
        std::vector<std::tuple<int, bool, std::string>> verdicts;
        for (const auto& v : sel.verdicts) verdicts.emplace_back(v.info.ordinal, v.qualifies, v.reason);
        return py::make_tuple(sel.chosen, verdicts);
      },
      py::arg("n"), py::arg("min_free_memory"), py::arg("max_utilization"), py::arg("order"), py::arg("exclude"));

  m.def("set_simulated_gpus", [](const std::string& spec) { set_simulated_gpus(parse_simulated_gpus(spec)); },
        py::arg("spec"));
  m.def("parse_simulated_gpus", &parse_simulated_gpus, py::arg("spec"));
  m.def("clear_simulated_gpus", &clear_simulated_gpus);
  m.def("simulation_origin", &simulation_origin);
  m.def("update_simulated_gpu", &update_simulated_gpu, py::arg("index"), py::arg("free_memory") = py::none(),
        py::arg("utilization") = py::none(), py::arg("processes") = py::none());
  m.def(
      "make_gpu_process",
      [](std::uint32_t pid, std::optional<std::uint64_t> used) { return GpuProcess{pid, used}; },
      py::arg("pid"), py::arg("used_memory") = py::none());

  m.def("manual_seed", [](std::uint64_t s) { default_generator().manual_seed(s); }, py::arg("seed"));
  m.def("seed", [] { return default_generator().seed(); });
  m.def("initial_seed", [] { return default_generator().initial_seed(); });
  m.def("random_u64", [] { return default_generator().next_u64(); });
}

}  // namespace gpufleet::bindings
