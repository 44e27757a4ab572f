// Exception types shared by every part, and the translation of core exceptions to Python.
#include "bindings/bindings.h"
#include "common/error.h"
#include "device/select.h"

namespace gpufleet::bindings {

void check_python_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

void bind_errors(py::module_& m) {
  static py::exception<CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  static py::exception<DeviceSelectionError> selection_error(m, "DeviceSelectionError", PyExc_RuntimeError);
  // DeviceSelectionTimeout is both a DeviceSelectionError and a TimeoutError.
  static py::object selection_timeout = py::reinterpret_steal<py::object>(PyErr_NewException(
      "gpufleet.DeviceSelectionTimeout", py::make_tuple(selection_error, py::handle(PyExc_TimeoutError)).ptr(),
      nullptr));
  m.attr("DeviceSelectionTimeout") = selection_timeout;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TypeError_& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const DeviceSelectionError& e) {
      PyErr_SetString(e.timed_out() ? selection_timeout.ptr() : selection_error.ptr(), e.what());
    } catch (const CudaError& e) {
      PyErr_SetString(cuda_error.ptr(), e.what());
    } catch (const InternalError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const std::logic_error& e) {
      // std::invalid_argument and std::out_of_range are std::logic_errors; keep pybind11's mapping.
      if (dynamic_cast<const std::invalid_argument*>(&e) || dynamic_cast<const std::domain_error*>(&e) ||
          dynamic_cast<const std::length_error*>(&e)) {
        PyErr_SetString(PyExc_ValueError, e.what());
      } else if (dynamic_cast<const std::out_of_range*>(&e)) {
        PyErr_SetString(PyExc_IndexError, e.what());
      } else {
        PyErr_SetString(PyExc_RuntimeError, e.what());
      }
    }
  });
}

}  // namespace gpufleet::bindings
