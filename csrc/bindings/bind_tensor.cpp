// Bindings for csrc/tensor: dtypes, Tensor, NumPy sharing, creation, scatter/gather. DLPack capsules
// are in bind_dlpack.cpp, devices/streams/events/memory in bind_stream.cpp (shared helpers:
// tensor_bindings.h). Argument parsing that is plain glue (to()'s positional forms, tensor() from
// nested lists, Module) lives in python/gpufleet/_tensor.py.
#include <pybind11/numpy.h>
#include <pybind11/operators.h>

#include <array>
#include <pybind11/stl.h>

#include "bindings/tensor_bindings.h"
#include "common/error.h"
#include "tensor/dlpack_exchange.h"
#include "tensor/stream.h"
#include "tensor/tensor.h"

namespace gpufleet::bindings {

std::string type_name(py::handle obj) {
  return py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>();
}

/// Releases a Python object held by a Storage: takes the GIL, and leaks the reference instead when
/// the interpreter is finalizing or gone (Note [DLPack ownership]).
void release_py_object(py::object* keep) {
  call_with_gil([keep] { delete keep; });
}

void call_with_gil(const std::function<void()>& f) {
  if (!Py_IsInitialized()) return;
#if PY_VERSION_HEX >= 0x030D0000
  if (Py_IsFinalizing()) return;
#else
  if (_Py_IsFinalizing()) return;
#endif
  py::gil_scoped_acquire gil;
  f();
}

std::shared_ptr<void> hold_py_object(py::object obj) {
  if (obj.is_none()) return nullptr;
  return std::shared_ptr<void>(new py::object(std::move(obj)),
                               [](void* p) { release_py_object(static_cast<py::object*>(p)); });
}

int cuda_index_from_py(py::handle obj, const char* what) {
  if (obj.is_none()) return current_cuda_index();
  const Device d = device_from_py(obj);
  GF_CHECK_ARG(d.is_cuda(), "{} expects a CUDA device, got '{}'", what, d.str());
  return resolve_device(d).index;
}

namespace {


/// The Python face of a DType. One instance per dtype (gpufleet.float32 is gpufleet.float32), as
/// torch.dtype objects are singletons.
struct PyDType {
  DType d;
};

std::array<py::object, kNumDTypes>& dtype_objects() {
  static auto* objs = new std::array<py::object, kNumDTypes>();  // leaked: outlives finalization
  return *objs;
}

py::object dtype_obj(DType d) { return dtype_objects()[static_cast<int>(d)]; }

/// A gpufleet dtype, a name ("float32", "half", "torch.float16"), a NumPy dtype or scalar type, or a
/// torch.dtype.
DType dtype_from_py(py::handle obj) {
  if (py::isinstance<PyDType>(obj)) return obj.cast<const PyDType&>().d;
  if (py::isinstance<py::str>(obj)) return parse_dtype(obj.cast<std::string>());
  if (py::isinstance<py::dtype>(obj)) {  // fast path for arrays' dtypes: kind and size, no strings
    const auto dt = py::reinterpret_borrow<py::dtype>(obj);
    const char kind = dt.kind();
    const auto size = dt.itemsize();
    if (dt.byteorder() != '>') {
      if (kind == 'b' && size == 1) return DType::Bool;
      if (kind == 'u' && size == 1) return DType::UInt8;
      if (kind == 'i' && size == 1) return DType::Int8;
      if (kind == 'i' && size == 2) return DType::Int16;
      if (kind == 'i' && size == 4) return DType::Int32;
      if (kind == 'i' && size == 8) return DType::Int64;
      if (kind == 'f' && size == 2) return DType::Float16;
      if (kind == 'f' && size == 4) return DType::Float32;
      if (kind == 'f' && size == 8) return DType::Float64;
    }
  }
  const std::string tname = type_name(obj);
  if (tname == "dtype" && py::hasattr(obj, "is_floating_point")) return parse_dtype(py::str(obj).cast<std::string>());
  try {
    py::dtype dt = py::dtype::from_args(py::reinterpret_borrow<py::object>(obj));
    if (!dt.attr("isnative").cast<bool>())
      throw TypeError_(fmt::format("dtype {} is not in native byte order", py::repr(obj).cast<std::string>()));
    const std::string name = py::str(dt.attr("name")).cast<std::string>();
    try {
      return parse_dtype(name);
    } catch (const TypeError_&) {
      throw TypeError_(fmt::format("unsupported dtype {}: gpufleet tensors hold {}", py::repr(obj).cast<std::string>(),
                                   accepted_dtype_names()));
    }
  } catch (const py::error_already_set&) {
    throw TypeError_(fmt::format("expected a dtype, got {} of type {}; accepted: gpufleet dtypes (gpufleet.float32), "
                                 "names ('float32'), NumPy dtypes or torch dtypes",
                                 py::repr(obj).cast<std::string>(), tname));
  }
}

std::optional<DType> opt_dtype(py::handle obj) {
  if (obj.is_none()) return std::nullopt;
  return dtype_from_py(obj);
}

std::optional<Device> opt_device(py::handle obj) {
  if (obj.is_none()) return std::nullopt;
  return device_from_py(obj);
}

Shape shape_from_py(py::handle obj) {
  if (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) return {obj.cast<std::int64_t>()};
  GF_CHECK_TYPE(py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj),
                "expected a shape (an int or a sequence of ints), got {}", py::repr(obj).cast<std::string>());
  Shape s;
  for (auto item : obj) {
    GF_CHECK_TYPE(PyLong_Check(item.ptr()) || py::hasattr(item, "__index__"),
                  "shape entries must be ints, got {} in {}", py::repr(item).cast<std::string>(),
                  py::repr(obj).cast<std::string>());
    s.push_back(py::int_(py::reinterpret_borrow<py::object>(item)).cast<std::int64_t>());
  }
  return s;
}

Scalar scalar_from_py(py::handle v) {
  if (PyBool_Check(v.ptr())) return std::int64_t{v.ptr() == Py_True ? 1 : 0};
  if (PyLong_Check(v.ptr())) return v.cast<std::int64_t>();
  if (PyFloat_Check(v.ptr())) return v.cast<double>();
  if (py::hasattr(v, "dtype") && py::hasattr(v, "item")) return scalar_from_py(v.attr("item")());
  throw TypeError_(fmt::format("expected a number (bool, int or float), got {} of type {}",
                               py::repr(v).cast<std::string>(), type_name(v)));
}

py::dtype numpy_dtype(DType d) {
  GF_CHECK_TYPE(d != DType::BFloat16,
                "NumPy has no bfloat16 dtype: convert first with t.to(gpufleet.float32).numpy() (exact: every "
                "bfloat16 value is a float32)");
  static auto* cache = new std::array<py::object, kNumDTypes>();  // leaked: outlives finalization
  auto& slot = (*cache)[static_cast<int>(d)];
  if (!slot) slot = py::dtype(std::string(dtype_name(d)));
  return py::reinterpret_borrow<py::dtype>(slot);
}

Tensor from_numpy(py::handle obj) {
  GF_CHECK_TYPE(py::isinstance<py::array>(obj), "from_numpy expects a numpy.ndarray, got {} of type {}",
                py::repr(obj).cast<std::string>().substr(0, 80), type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  const DType dt = dtype_from_py(a.dtype());
  GF_CHECK_ARG(a.writeable(),
               "from_numpy needs a writeable array (gpufleet tensors are writable and share its memory); "
               "pass a.copy(), or use gpufleet.tensor(a) to copy it");
  const auto item = static_cast<std::int64_t>(itemsize(dt));
  Shape shape(a.shape(), a.shape() + a.ndim()), strides(a.ndim());
  std::int64_t last = 0;
  const std::int64_t numel = checked_numel(shape);
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const std::int64_t st = a.strides()[i];
    if (shape[i] <= 1) {
      strides[i] = std::max<std::int64_t>(st / item, 0);
      continue;
    }
    GF_CHECK_ARG(st >= 0, "from_numpy does not support negative strides (array strides {}); pass a.copy()",
                 shape_str(Shape(a.strides(), a.strides() + a.ndim())));
    GF_CHECK_ARG(st % item == 0, "from_numpy needs strides that are multiples of the {}-byte element size (array "
                 "strides {}); pass a.copy()", item, shape_str(Shape(a.strides(), a.strides() + a.ndim())));
    strides[i] = st / item;
    last += (shape[i] - 1) * strides[i];
  }
  void* data = const_cast<void*>(a.data());
  GF_CHECK_ARG(reinterpret_cast<std::uintptr_t>(data) % item == 0 || numel == 0,
               "from_numpy needs an aligned array; pass a.copy()");
  const std::size_t nbytes = numel > 0 ? static_cast<std::size_t>((last + 1) * item) : 0;
  auto* keep = new py::object(py::reinterpret_borrow<py::object>(obj));
  auto storage = wrap_storage(numel > 0 ? data : nullptr, nbytes, Device::cpu(), MemoryKind::Pageable,
                              [keep](void*) { release_py_object(keep); });
  return Tensor(std::move(storage), 0, std::move(shape), std::move(strides), dt);
}

py::array to_numpy(py::object self) {
  const Tensor& t = self.cast<const Tensor&>();
  if (!t.device().is_cpu())
    throw TypeError_(fmt::format("can't convert {} device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                                 "to host memory first.",
                                 t.device().str()));
  py::dtype dt = numpy_dtype(t.dtype());
  if (t.storage()->has_pending()) {
    py::gil_scoped_release nogil;
    t.storage()->wait_pending();
  }
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end()), strides;
  for (auto s : t.strides()) strides.push_back(static_cast<py::ssize_t>(s * static_cast<std::int64_t>(t.itemsize())));
  static char dummy[64];  // NumPy wants a non-NULL pointer even for empty arrays
  void* data = t.data_ptr() ? t.data_ptr() : dummy;
  return py::array(dt, shape, strides, data, self);
}

/// True when `b` is `a` unchanged (so Python can return the very same object, as PyTorch does).
bool same_view(const Tensor& a, const Tensor& b) {
  return a.shares_storage_with(b) && a.storage_offset() == b.storage_offset() && a.shape() == b.shape() &&
         a.strides() == b.strides() && a.dtype() == b.dtype();
}

py::object self_or(py::object self, Tensor result) {
  if (same_view(self.cast<const Tensor&>(), result)) return self;
  return py::cast(std::move(result));
}

std::vector<Device> devices_from_py(py::handle seq) {
  GF_CHECK_TYPE(py::isinstance<py::sequence>(seq) && !py::isinstance<py::str>(seq),
                "devices must be a sequence of devices, got {}", py::repr(seq).cast<std::string>());
  std::vector<Device> out;
  for (auto d : seq) out.push_back(device_from_py(d));
  return out;
}

py::object tensor_dlpack(const Tensor& self, py::object stream, py::object max_version, py::object dl_device,
                         py::object copy) {
  return export_dlpack({self, nullptr, nullptr}, std::move(stream), std::move(max_version), std::move(dl_device),
                       std::move(copy));
}

}  // namespace

void bind_tensor(py::module_& m) {
  // Streams and events first: Tensor.record_stream names Stream in its signature, which must be a
  // registered type when the method is defined (Note [Stubs] in scripts/stubs.sh).
  bind_tensor_streams(m);
  py::class_<PyDType>(m, "dtype", "A gpufleet element type (gpufleet.float32, gpufleet.bfloat16, ...).")
      .def_property_readonly("name", [](const PyDType& d) { return std::string(dtype_name(d.d)); })
      .def_property_readonly("itemsize", [](const PyDType& d) { return itemsize(d.d); })
      .def_property_readonly("is_floating_point", [](const PyDType& d) { return is_floating_point(d.d); })
      .def("__repr__", [](const PyDType& d) { return fmt::format("gpufleet.{}", dtype_name(d.d)); })
      .def("__reduce__", [](const PyDType& d) -> py::tuple {
        return py::make_tuple(py::module_::import("gpufleet").attr("as_dtype"), py::make_tuple(dtype_name(d.d)));
      });
  for (int i = 0; i < kNumDTypes; ++i) {
    dtype_objects()[i] = py::cast(PyDType{static_cast<DType>(i)});
    m.attr(("dtype_" + std::string(dtype_name(static_cast<DType>(i)))).c_str()) = dtype_objects()[i];
  }
  m.def("as_dtype", [](py::handle obj) { return dtype_obj(dtype_from_py(obj)); }, py::arg("dtype"),
        "Converts a dtype-like (gpufleet dtype, name, NumPy dtype, torch.dtype) to a gpufleet dtype.");

  py::class_<Tensor>(m, "Tensor", "An n-dimensional array on the host or a CUDA device.")
      .def_property_readonly("dtype", [](const Tensor& t) { return dtype_obj(t.dtype()); })
      .def_property_readonly("shape", [](const Tensor& t) { return py::tuple(py::cast(t.shape())); })
      .def_property_readonly("strides", [](const Tensor& t) { return py::tuple(py::cast(t.strides())); },
                             "Strides in elements (PyTorch's convention, not NumPy's bytes).")
      .def_property_readonly("ndim", &Tensor::ndim)
      .def_property_readonly("device", [](const Tensor& t) { return t.device(); })
      .def_property_readonly("is_cuda", &Tensor::is_cuda)
      .def_property_readonly("nbytes", &Tensor::nbytes)
      .def_property_readonly("itemsize", &Tensor::itemsize)
      .def_property_readonly("memory_kind", [](const Tensor& t) { return std::string(memory_kind_name(t.memory_kind())); },
                             "'pageable', 'pinned' or 'device'.")
      .def("dim", &Tensor::ndim)
      .def("numel", &Tensor::numel)
      .def("element_size", &Tensor::itemsize)
      .def("size", [](const Tensor& t, std::optional<int> dim) -> py::object {
             if (dim) return py::int_(t.size(*dim));
             return py::tuple(py::cast(t.shape()));
           }, py::arg("dim") = py::none())
      .def("stride", [](const Tensor& t, std::optional<int> dim) -> py::object {
             if (dim) return py::int_(t.strides()[t.wrap_dim(*dim)]);
             return py::tuple(py::cast(t.strides()));
           }, py::arg("dim") = py::none())
      .def("is_contiguous", &Tensor::is_contiguous)
      .def("is_pinned", &Tensor::is_pinned)
      .def("storage_offset", &Tensor::storage_offset)
      .def("data_ptr", [](const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()); })
      .def("_shares_storage_with", &Tensor::shares_storage_with)
      .def("_to", [](py::object self, py::object device, py::object dtype, bool non_blocking, bool copy) {
             const Tensor& t = self.cast<const Tensor&>();
             auto dev = opt_device(device);
             auto dt = opt_dtype(dtype);
             Tensor out;
             {
               py::gil_scoped_release nogil;
               out = t.to(dev, dt, non_blocking, copy);
             }
             return self_or(self, std::move(out));
           })
      .def("cpu", [](py::object self, bool non_blocking) {
             Tensor out;
             {
               const Tensor& t = self.cast<const Tensor&>();
               py::gil_scoped_release nogil;
               out = t.cpu(non_blocking);
             }
             return self_or(self, std::move(out));
           }, py::arg("non_blocking") = false)
      .def("cuda", [](py::object self, py::object index, bool non_blocking) {
             std::optional<int> idx;
             if (!index.is_none()) idx = cuda_index_from_py(index, "Tensor.cuda");
             Tensor out;
             {
               const Tensor& t = self.cast<const Tensor&>();
               py::gil_scoped_release nogil;
               out = t.cuda(idx, non_blocking);
             }
             return self_or(self, std::move(out));
           }, py::arg("device") = py::none(), py::arg("non_blocking") = false)
      .def("pin_memory", [](py::object self) {
             Tensor out;
             {
               const Tensor& t = self.cast<const Tensor&>();
               py::gil_scoped_release nogil;
               out = t.pin_memory();
             }
             return self_or(self, std::move(out));
           })
      .def("contiguous", [](py::object self) {
             Tensor out;
             {
               const Tensor& t = self.cast<const Tensor&>();
               py::gil_scoped_release nogil;
               out = t.contiguous();
             }
             return self_or(self, std::move(out));
           })
      .def("clone", &Tensor::clone, py::call_guard<py::gil_scoped_release>())
      .def("copy_", [](py::object self, py::object src, bool non_blocking) {
             const Tensor& t = self.cast<const Tensor&>();
             Tensor s = py::isinstance<Tensor>(src) ? src.cast<Tensor>() : from_numpy(src);
             {
               py::gil_scoped_release nogil;
               t.copy_(s, non_blocking);
             }
             return self;
           }, py::arg("src"), py::arg("non_blocking") = false,
           "Copies src (a Tensor or a NumPy array of the same shape) into this tensor, converting the dtype.")
      .def("fill_", [](py::object self, py::handle value) {
             const Tensor& t = self.cast<const Tensor&>();
             const Scalar v = scalar_from_py(value);
             {
               py::gil_scoped_release nogil;
               t.fill_(v);
             }
             return self;
           }, py::arg("value"))
      .def("numpy", &to_numpy,
           "A NumPy array sharing this CPU tensor's memory (TypeError for CUDA tensors and for bfloat16).")
      .def("__dlpack__", &tensor_dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none(),
           "DLPack export (Note [DLPack export]): a consumer's stream waits for the work queued so far on the "
           "current gpufleet stream of the tensor's device, as torch.Tensor.__dlpack__ does with PyTorch's.")
      .def("record_stream", &Tensor::record_stream, py::arg("stream"),
           "PyTorch's Tensor.record_stream: the memory is not reused before the work queued on `stream` when the "
           "tensor is freed has finished (the stream must still exist then).")
      .def("__dlpack_device__", [](const Tensor& t) {
        const DLDevice d = dlpack_device(t);
        return py::make_tuple(static_cast<int>(d.device_type), d.device_id);
      })
      .def("narrow", &Tensor::narrow, py::arg("dim"), py::arg("start"), py::arg("length"))
      .def("select", &Tensor::select, py::arg("dim"), py::arg("index"))
      .def("_slice", &Tensor::slice)
      .def("permute", [](const Tensor& t, py::args dims) {
        std::vector<int> d;
        if (dims.size() == 1 && py::isinstance<py::sequence>(dims[0])) d = dims[0].cast<std::vector<int>>();
        else d = dims.cast<std::vector<int>>();
        return t.permute(d);
      })
      .def("transpose", &Tensor::transpose, py::arg("dim0"), py::arg("dim1"))
      .def("reshape", [](const Tensor& t, py::args shape) {
        return t.reshape(shape.size() == 1 ? shape_from_py(shape[0]) : shape_from_py(shape));
      })
      .def("view", [](const Tensor& t, py::args shape) {
        return t.view(shape.size() == 1 ? shape_from_py(shape[0]) : shape_from_py(shape));
      })
      .def("__len__", [](const Tensor& t) {
        if (t.ndim() == 0) throw TypeError_("len() of a 0-d tensor");
        return t.shape()[0];
      })
      .def("__str__", &Tensor::str);

  m.def("from_numpy", &from_numpy, py::arg("array"),
        "A tensor sharing the array's memory (no copy); the array is kept alive by the tensor.");

  m.def("empty", [](py::handle shape, py::handle dtype, py::handle device, bool pin) {
        const Shape s = shape_from_py(shape);
        const DType d = dtype.is_none() ? DType::Float32 : dtype_from_py(dtype);
        const Device dev = device.is_none() ? Device::cpu() : device_from_py(device);
        py::gil_scoped_release nogil;
        return Tensor::empty(s, d, dev, pin);
      }, py::arg("shape"), py::arg("dtype") = py::none(), py::arg("device") = py::none(), py::arg("pin_memory") = false);
  m.def("full", [](py::handle shape, py::handle value, py::handle dtype, py::handle device, bool pin) {
        const Shape s = shape_from_py(shape);
        const Scalar v = scalar_from_py(value);
        const DType d = dtype_from_py(dtype);
        const Device dev = device.is_none() ? Device::cpu() : device_from_py(device);
        py::gil_scoped_release nogil;
        return Tensor::full(s, v, d, dev, pin);
      }, py::arg("shape"), py::arg("value"), py::arg("dtype"), py::arg("device") = py::none(),
      py::arg("pin_memory") = false);
  m.def("cat", [](const std::vector<Tensor>& ts, int dim) {
        py::gil_scoped_release nogil;
        return cat(ts, dim);
      }, py::arg("tensors"), py::arg("dim") = 0);
  m.def("chunk_sizes", &chunk_sizes, py::arg("n"), py::arg("k"));
  m.def("scatter", [](const Tensor& t, py::handle devices, int dim, std::optional<std::vector<std::int64_t>> sizes) {
        auto devs = devices_from_py(devices);
        py::gil_scoped_release nogil;
        return scatter(t, devs, dim, sizes);
      }, py::arg("tensor"), py::arg("devices"), py::arg("dim") = 0, py::arg("chunk_sizes") = py::none());
  m.def("gather", [](const std::vector<Tensor>& ts, py::handle device, int dim) {
        const Device d = device_from_py(device);
        py::gil_scoped_release nogil;
        return gather(ts, d, dim);
      }, py::arg("tensors"), py::arg("device"), py::arg("dim") = 0);
  m.def("broadcast", [](const Tensor& t, py::handle devices) {
        auto devs = devices_from_py(devices);
        py::gil_scoped_release nogil;
        return broadcast(t, devs);
      }, py::arg("tensor"), py::arg("devices"));

  bind_tensor_dlpack(m);
}

}  // namespace gpufleet::bindings
