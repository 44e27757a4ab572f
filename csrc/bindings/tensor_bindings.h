#pragma once
/// Shared by the tensor binding files (bind_tensor.cpp: dtypes, Tensor, creation; bind_dlpack.cpp:
/// capsules; bind_stream.cpp: devices, streams, events, memory) and bind_kernels.cpp.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "bindings/bindings.h"
#include "tensor/tensor.h"

namespace gpufleet::bindings {

/// The Python type name of `obj`, for messages.
std::string type_name(py::handle obj);

/// Deletes a Python object held by C++ (a Storage's deleter, a kernel result's stream owner): takes
/// the GIL, and leaks the reference instead when the interpreter is finalizing or gone (Note
/// [DLPack ownership]). Safe from any thread.
void release_py_object(py::object* keep);
/// Calls f with the GIL held (skipped when the interpreter is finalizing or gone).
void call_with_gil(const std::function<void()>& f);
/// Shares ownership of a Python object from C++ (null for None); released by release_py_object.
std::shared_ptr<void> hold_py_object(py::object obj);

/// The CUDA device index of a device-like (None: the current device); ValueError for a CPU device.
int cuda_index_from_py(py::handle obj, const char* what);

/// Note [DLPack export]: one implementation of `__dlpack__(stream, max_version, dl_device, copy)` (the
/// array API standard's rules for dl_device and copy, BufferError where they cannot be met) for
/// gpufleet tensors and kernel results. They differ only in what a consumer's stream waits for:
/// - a Tensor: the work queued so far on the current gpufleet stream of its device (PyTorch's rule
///   for torch.Tensor.__dlpack__: a tensor written on another stream must be synchronised, or that
///   stream made current, before it is exported);
/// - a kernel result: the event recorded when its kernels were queued (Note [Kernel result
///   lifetimes]), whatever thread or stream is current at the export.
/// A copy (copy=True, or dl_device=(1, 0) for device data) runs on the current gpufleet stream after
/// `before_copy` made that stream wait for the data; the copy then follows the Tensor rule.
struct ExportSource {
  Tensor tensor;
  /// Makes the consumer's stream (a DLPack stream value; None means 1) see the data. Null: the Tensor rule.
  std::function<void(std::optional<std::int64_t>)> sync_for_consumer;
  /// Makes the current gpufleet stream of the device see the data before a copy. Null: nothing to do.
  std::function<void()> before_copy;
};
py::object export_dlpack(const ExportSource& src, py::object stream, py::object max_version, py::object dl_device,
                         py::object copy);

void bind_tensor_dlpack(py::module_& m);
void bind_tensor_streams(py::module_& m);

}  // namespace gpufleet::bindings
