#pragma once
/// Shared declarations for the binding files. Each part has one `bind_<part>.cpp` with one
/// `bind_<part>(module)` function, called from module.cpp. Bindings stay thin: convert arguments,
/// release the GIL around long calls, call the core.
#include <pybind11/pybind11.h>

#include "device/device.h"

namespace gpufleet::bindings {

namespace py = pybind11;

void bind_errors(py::module_& m);
void bind_device(py::module_& m);
void bind_tensor(py::module_& m);
void bind_dispatch(py::module_& m);
void bind_journal(py::module_& m);
void bind_kernels(py::module_& m);
void bind_pipeline(py::module_& m);

/// Converts anything gpufleet accepts as a device: a gpufleet.Device, a string ('cpu', 'cuda:1'),
/// an int N (meaning cuda:N), a DeviceInfo, or any object with `.type` and `.index` (torch.device).
/// Raises TypeError/ValueError naming the value and the accepted forms.
Device device_from_py(py::handle obj);

/// Calls PyErr_CheckSignals with the GIL held and throws py::error_already_set on a pending
/// KeyboardInterrupt; for long C++ loops that run with the GIL released.
void check_python_signals();

}  // namespace gpufleet::bindings
