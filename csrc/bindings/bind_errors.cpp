// Exception types shared by every part, and the translation of core exceptions to Python.
#include <cstring>

#include "bindings/bindings.h"
#include "common/error.h"
#include "device/select.h"

namespace gpufleet::bindings {

namespace {
// Sets a Python exception from a core message. PyErr_SetString decodes strictly: one byte that is not
// UTF-8 (a file name, half a character quoted by a parser) turned the error into a UnicodeDecodeError.
// Messages name user values through printable() (common/printable.h), which also keeps NUL bytes from
// cutting them; this is the safety net for the rest.
void set_error(PyObject* type, const char* what) {
  PyObject* text = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "backslashreplace");
  if (text == nullptr) {  // out of memory: keep whatever error decoding raised
    return;
  }
  PyErr_SetObject(type, text);
  Py_DECREF(text);
}
}  // namespace

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
    } catch (const py::error_already_set&) {
      throw;  // a Python exception on its way back: pybind11 restores it
    } catch (const py::builtin_exception&) {
      throw;  // pybind11's own (cast_error, stop_iteration, ...): its translator knows them
    } catch (const TypeError_& e) {
      set_error(PyExc_TypeError, e.what());
    } catch (const DeviceSelectionError& e) {
      set_error(e.timed_out() ? selection_timeout.ptr() : selection_error.ptr(), e.what());
    } catch (const CudaError& e) {
      set_error(cuda_error.ptr(), e.what());
    } catch (const InternalError& e) {
      set_error(PyExc_RuntimeError, e.what());
    } catch (const std::logic_error& e) {
      // std::invalid_argument and std::out_of_range are std::logic_errors; keep pybind11's mapping.
      if (dynamic_cast<const std::invalid_argument*>(&e) || dynamic_cast<const std::domain_error*>(&e) ||
          dynamic_cast<const std::length_error*>(&e)) {
        set_error(PyExc_ValueError, e.what());
      } else if (dynamic_cast<const std::out_of_range*>(&e)) {
        set_error(PyExc_IndexError, e.what());
      } else {
        set_error(PyExc_RuntimeError, e.what());
      }
    } catch (const std::overflow_error& e) {
      set_error(PyExc_OverflowError, e.what());
    } catch (const std::range_error& e) {
      set_error(PyExc_ValueError, e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "std::bad_alloc");
    } catch (const std::exception& e) {
      set_error(PyExc_RuntimeError, e.what());
    }
  });
}

}  // namespace gpufleet::bindings
