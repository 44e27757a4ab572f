// DLPack capsules for gpufleet tensors and kernel results (Note [DLPack export] in tensor_bindings.h):
// export with the array API's stream/dl_device/copy rules, import of both capsule kinds.
#include <pybind11/stl.h>

#include "bindings/tensor_bindings.h"
#include "common/error.h"
#include "tensor/dlpack_exchange.h"
#include "tensor/stream.h"

namespace gpufleet::bindings {

namespace {

void dltensor_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "used_dltensor")) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (m == nullptr) PyErr_WriteUnraisable(capsule);
  else if (m->deleter) m->deleter(m);
  PyErr_Restore(type, value, tb);
}

void dltensor_versioned_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "used_dltensor_versioned")) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, "dltensor_versioned"));
  if (m == nullptr) PyErr_WriteUnraisable(capsule);
  else if (m->deleter) m->deleter(m);
  PyErr_Restore(type, value, tb);
}

Tensor from_dlpack_capsule(py::handle capsule, std::optional<bool> copy) {
  PyObject* c = capsule.ptr();
  GF_CHECK_TYPE(PyCapsule_CheckExact(c), "expected a DLPack capsule or an object with __dlpack__, got {}",
                type_name(capsule));
  Tensor t;
  bool read_only = false, producer_copied = false;
  if (PyCapsule_IsValid(c, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
    producer_copied = (m->flags & DLPACK_FLAG_BITMASK_IS_COPIED) != 0;
    if (PyCapsule_SetName(c, "used_dltensor_versioned") != 0) throw py::error_already_set();
    t = from_dlpack(m, &read_only, call_with_gil);
  } else if (PyCapsule_IsValid(c, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
    if (PyCapsule_SetName(c, "used_dltensor") != 0) throw py::error_already_set();
    t = from_dlpack(m, call_with_gil);
  } else {
    const char* name = PyCapsule_GetName(c);
    PyErr_Clear();
    throw std::invalid_argument(fmt::format("this capsule cannot be imported: its name is '{}' (a DLPack capsule is "
                                            "named 'dltensor' or 'dltensor_versioned'; 'used_*' ones were already "
                                            "consumed)",
                                            name ? name : "NULL"));
  }
  if (read_only) {
    if (copy == false)
      throw py::buffer_error("the producer exported a read-only array and gpufleet tensors are writable: a copy "
                             "is needed but copy=False");
    py::gil_scoped_release nogil;
    return t.clone();
  }
  if (copy == true && !producer_copied) {
    py::gil_scoped_release nogil;
    return t.clone();
  }
  return t;
}

}  // namespace

py::object export_dlpack(const ExportSource& src, py::object stream, py::object max_version, py::object dl_device,
                         py::object copy) {
  Tensor t = src.tensor;
  bool copied = false, host_as_cpu = false;
  const std::optional<bool> cp = copy.is_none() ? std::nullopt : std::optional<bool>(copy.cast<bool>());
  auto copy_with = [&](const std::function<Tensor(const Tensor&)>& make) {
    py::gil_scoped_release nogil;
    if (src.before_copy) src.before_copy();
    t = make(t);
    copied = true;
  };
  if (!dl_device.is_none()) {
    const auto want = dl_device.cast<std::pair<int, int>>();
    const DLDevice own = dlpack_device(t);
    const bool host_view = t.device().is_cpu() && want.first == kDLCPU && want.second == 0;
    host_as_cpu = host_view;
    if (!(want.first == own.device_type && want.second == own.device_id) && !host_view) {
      if (want.first == kDLCPU && want.second == 0) {
        if (cp == false)
          throw py::buffer_error(fmt::format("exporting a tensor on {} to the CPU (dl_device=(1, 0)) needs a copy, "
                                             "but copy=False",
                                             t.device().str()));
        copy_with([](const Tensor& x) { return x.to(Device::cpu()); });
      } else {
        throw py::buffer_error(fmt::format("cannot export a tensor on {} (DLPack device ({}, {})) to DLPack device "
                                           "({}, {}): gpufleet exports to the tensor's own device or to the CPU (1, 0)",
                                           t.device().str(), static_cast<int>(own.device_type), own.device_id,
                                           want.first, want.second));
      }
    }
  }
  if (cp == true && !copied) copy_with([](const Tensor& x) { return x.clone(); });
  std::optional<std::int64_t> s;
  if (!stream.is_none()) {
    GF_CHECK_TYPE(PyLong_Check(stream.ptr()) && !PyBool_Check(stream.ptr()),
                  "stream must be None or an int (1: legacy default stream, 2: per-thread default, -1: no "
                  "synchronisation, or a cudaStream_t), got {}",
                  py::repr(stream).cast<std::string>());
    s = stream.cast<std::int64_t>();
  }
  auto sync = [&] {
    if (src.sync_for_consumer && !copied)
      src.sync_for_consumer(s);
    else
      dlpack_sync_for_consumer(t, s);
  };
  if (t.device().is_cuda() || t.storage()->has_pending()) {
    py::gil_scoped_release nogil;
    sync();
  } else {
    sync();  // checks the stream argument; nothing to wait for
  }
  bool versioned = false;
  if (!max_version.is_none()) {
    const auto mv = max_version.cast<std::pair<int, int>>();
    versioned = mv.first >= 1;
  }
  PyObject* cap = versioned ? PyCapsule_New(to_dlpack_versioned(t, copied, host_as_cpu), "dltensor_versioned",
                                            dltensor_versioned_capsule_destructor)
                            : PyCapsule_New(to_dlpack(t, host_as_cpu), "dltensor", dltensor_capsule_destructor);
  if (!cap) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(cap);
}

void bind_tensor_dlpack(py::module_& m) {
  m.def("_from_dlpack_capsule", &from_dlpack_capsule, py::arg("capsule"), py::arg("copy") = py::none());
  m.def("_consumer_stream", [](int device) -> std::int64_t {
    const Stream s = current_stream(device);
    return s.is_default() ? 1 : static_cast<std::int64_t>(s.handle());
  });
}

}  // namespace gpufleet::bindings
