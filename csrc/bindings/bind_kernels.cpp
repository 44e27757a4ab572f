// Bindings for csrc/kernels: converts NumPy arrays (CPU) and DLPack capsules (CUDA) to ArrayRef,
// allocates the outputs (NumPy arrays, or device memory handed back as a DLPack-exporting buffer),
// releases the GIL around the kernels. Python-side glue (array types, axes) is in gpufleet/kernels.py.
#include <pybind11/numpy.h>
#include <fmt/ranges.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "common/dlpack.h"
#include "common/error.h"
#include "kernels/array.h"
#include "kernels/canny.h"
#include "kernels/congestion.h"
#include "kernels/gaussian_blur.h"
#include "kernels/kmeans1d.h"
#include "kernels/parallel.h"
#include "kernels/reduce.h"

namespace gpufleet::bindings {

namespace {

using kernels::ArrayRef;
using kernels::Buffer;
using kernels::DType;

DType dtype_from_numpy(const py::array& a, const char* op) {
  const char kind = a.dtype().kind();
  const auto size = a.dtype().itemsize();
  if (kind == 'u' && size == 1) return DType::U8;
  if (kind == 'i' && size == 4) return DType::I32;
  if (kind == 'i' && size == 8) return DType::I64;
  if (kind == 'f' && size == 4) return DType::F32;
  if (kind == 'f' && size == 8) return DType::F64;
  throw std::invalid_argument(fmt::format("{}: unsupported dtype {}", op, py::str(a.dtype()).cast<std::string>()));
}

py::dtype numpy_dtype(DType t) {
  switch (t) {
    case DType::U8: return py::dtype::of<std::uint8_t>();
    case DType::I32: return py::dtype::of<std::int32_t>();
    case DType::I64: return py::dtype::of<std::int64_t>();
    case DType::F32: return py::dtype::of<float>();
    case DType::F64: return py::dtype::of<double>();
  }
  return py::dtype::of<std::uint8_t>();
}

DType dtype_from_dlpack(DLDataType t, const char* op) {
  if (t.lanes == 1) {
    if (t.code == kDLUInt && t.bits == 8) return DType::U8;
    if (t.code == kDLInt && t.bits == 32) return DType::I32;
    if (t.code == kDLInt && t.bits == 64) return DType::I64;
    if (t.code == kDLFloat && t.bits == 32) return DType::F32;
    if (t.code == kDLFloat && t.bits == 64) return DType::F64;
  }
  throw std::invalid_argument(fmt::format("{}: unsupported DLPack dtype (code {}, {} bits, {} lanes): expected uint8, "
                                          "int32, int64, float32 or float64",
                                          op, t.code, t.bits, t.lanes));
}

DLDataType dlpack_dtype(DType t) {
  switch (t) {
    case DType::U8: return {kDLUInt, 8, 1};
    case DType::I32: return {kDLInt, 32, 1};
    case DType::I64: return {kDLInt, 64, 1};
    case DType::F32: return {kDLFloat, 32, 1};
    case DType::F64: return {kDLFloat, 64, 1};
  }
  return {kDLUInt, 8, 1};
}

// A device array owned by the kernels, exported through DLPack (the result type for CUDA inputs
// whose own library cannot import it). Each export shares ownership of the memory.
struct DLPackBuffer {
  Buffer buffer;

  struct Ctx {
    std::shared_ptr<void> storage;
    std::vector<std::int64_t> shape, strides;
  };

  std::pair<int, int> device() const {
    return {buffer.ref.device.is_cuda() ? kDLCUDA : kDLCPU, buffer.ref.device.is_cuda() ? buffer.ref.device.index : 0};
  }

  py::capsule dlpack(py::object stream, py::object max_version) const {
    // Make our work visible on the consumer's stream (REFERENCE: None means the legacy default stream).
    if (buffer.ref.device.is_cuda()) {
      std::intptr_t consumer = stream.is_none() ? 1 : stream.cast<std::intptr_t>();
      GF_CHECK_ARG(consumer != 0, "__dlpack__(stream=0): 0 is not a valid CUDA stream in DLPack; use 1 for the "
                                  "legacy default stream, 2 for the per-thread default stream, -1 for no synchronisation");
      kernels::stream_wait(buffer.ref.device, buffer.ref.stream, consumer);
    }
    auto* ctx = new Ctx{buffer.storage, buffer.ref.shape, {}};
    ctx->strides.resize(ctx->shape.size());
    std::int64_t s = 1;
    for (int i = static_cast<int>(ctx->shape.size()) - 1; i >= 0; --i) {
      ctx->strides[i] = s;
      s *= ctx->shape[i];
    }
    DLTensor t{};
    t.data = buffer.ref.data;
    auto [dt, di] = device();
    t.device = {static_cast<DLDeviceType>(dt), di};
    t.ndim = static_cast<std::int32_t>(ctx->shape.size());
    t.dtype = dlpack_dtype(buffer.ref.dtype);
    t.shape = ctx->shape.data();
    t.strides = ctx->strides.data();
    t.byte_offset = 0;
    bool versioned = false;
    if (!max_version.is_none()) {
      auto mv = max_version.cast<std::pair<int, int>>();
      versioned = mv.first >= 1;
    }
    if (versioned) {
      auto* m = new DLManagedTensorVersioned{};
      m->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
      m->manager_ctx = ctx;
      m->deleter = [](DLManagedTensorVersioned* self) {
        delete static_cast<Ctx*>(self->manager_ctx);
        delete self;
      };
      m->flags = 0;
      m->dl_tensor = t;
      return py::capsule(m, "dltensor_versioned", [](PyObject* cap) {
        if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
          auto* p = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
          if (p && p->deleter) p->deleter(p);
        }
      });
    }
    auto* m = new DLManagedTensor{};
    m->dl_tensor = t;
    m->manager_ctx = ctx;
    m->deleter = [](DLManagedTensor* self) {
      delete static_cast<Ctx*>(self->manager_ctx);
      delete self;
    };
    return py::capsule(m, "dltensor", [](PyObject* cap) {
      if (PyCapsule_IsValid(cap, "dltensor")) {
        auto* p = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
        if (p && p->deleter) p->deleter(p);
      }
    });
  }
};

// An input: a NumPy array (C-contiguous, converted by the Python glue) or, for CUDA, the capsule
// from x.__dlpack__(stream=...) kept alive while the kernels read it.
struct Input {
  ArrayRef ref;
  py::object keep_alive;
};

bool is_cuda_object(const py::handle& x) {
  if (py::isinstance<py::array>(x) || !py::hasattr(x, "__dlpack_device__")) return false;
  auto dev = x.attr("__dlpack_device__")().cast<std::pair<int, int>>();
  return dev.first == kDLCUDA;
}

Input to_input(const py::object& x, std::uintptr_t stream, const char* op) {
  Input in;
  if (is_cuda_object(x)) {
    py::object cap = x.attr("__dlpack__")(py::arg("stream") = static_cast<std::intptr_t>(stream));
    GF_CHECK_TYPE(PyCapsule_IsValid(cap.ptr(), "dltensor"), "{}: __dlpack__() did not return a 'dltensor' capsule", op);
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    const DLTensor& t = m->dl_tensor;
    GF_CHECK_ARG(t.device.device_type == kDLCUDA, "{}: expected a CUDA DLPack tensor, got device type {}", op,
                 static_cast<int>(t.device.device_type));
    in.ref.dtype = dtype_from_dlpack(t.dtype, op);
    in.ref.shape.assign(t.shape, t.shape + t.ndim);
    if (t.strides) {
      std::int64_t s = 1;
      for (int i = t.ndim - 1; i >= 0; --i) {
        GF_CHECK_ARG(t.shape[i] == 1 || t.strides[i] == s,
                     "{}: the CUDA array is not C-contiguous (shape {}, strides {}): call .contiguous() first", op,
                     fmt::join(std::vector<std::int64_t>(t.shape, t.shape + t.ndim), "x"),
                     fmt::join(std::vector<std::int64_t>(t.strides, t.strides + t.ndim), "x"));
        s *= t.shape[i];
      }
    }
    in.ref.data = static_cast<char*>(t.data) + t.byte_offset;
    in.ref.device = Device::cuda(t.device.device_id);
    in.ref.stream = stream;
    in.keep_alive = cap;  // the capsule's destructor calls the producer's deleter
    return in;
  }
  py::array a = py::reinterpret_borrow<py::array>(x);
  GF_ASSERT(a.flags() & py::array::c_style, "{}: input is not C-contiguous", op);
  in.ref.dtype = dtype_from_numpy(a, op);
  in.ref.shape.assign(a.shape(), a.shape() + a.ndim());
  in.ref.data = const_cast<void*>(a.data());
  in.ref.device = Device::cpu();
  in.keep_alive = a;
  return in;
}

// An output on the input's device: a NumPy array on the CPU, a DLPackBuffer on CUDA.
struct Output {
  ArrayRef ref;
  py::object obj;
};

Output make_output(const ArrayRef& like, DType dtype, std::vector<std::int64_t> shape) {
  Output o;
  if (like.device.is_cuda()) {
    Buffer b = kernels::allocate(like.device, dtype, shape, like.stream);
    o.ref = b.ref;
    o.obj = py::cast(DLPackBuffer{b});
    return o;
  }
  py::array a(numpy_dtype(dtype), std::vector<py::ssize_t>(shape.begin(), shape.end()));
  o.ref.data = a.mutable_data();
  o.ref.dtype = dtype;
  o.ref.shape = std::move(shape);
  o.ref.device = Device::cpu();
  o.obj = a;
  return o;
}

}  // namespace

void bind_kernels(py::module_& m) {
  py::class_<DLPackBuffer>(m, "KernelBuffer",
                           "A device array produced by gpufleet.kernels, exported through DLPack "
                           "(torch.from_dlpack / cupy.from_dlpack / np.from_dlpack accept it).")
      .def(
          "__dlpack__",
          [](const DLPackBuffer& b, py::object stream, py::object max_version, py::object dl_device, py::object copy) {
            GF_CHECK_ARG(copy.is_none() || !copy.cast<bool>(), "KernelBuffer.__dlpack__: copy=True is not supported");
            return b.dlpack(stream, max_version);
          },
          py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", &DLPackBuffer::device)
      .def_property_readonly("shape", [](const DLPackBuffer& b) { return py::tuple(py::cast(b.buffer.ref.shape)); })
      .def_property_readonly("dtype", [](const DLPackBuffer& b) { return std::string(kernels::dtype_name(b.buffer.ref.dtype)); })
      .def_property_readonly("device", [](const DLPackBuffer& b) { return b.buffer.ref.device; })
      .def("__repr__", [](const DLPackBuffer& b) { return fmt::format("KernelBuffer({})", b.buffer.ref.describe()); });

  m.def("_kernels_num_threads", &kernels::num_threads);
  m.def("_kernels_set_num_threads", &kernels::set_num_threads, py::arg("n"));
  m.def("_kernels_is_cuda", [](py::object x) { return is_cuda_object(x); });

  m.def(
      "_kernels_gaussian_blur",
      [](py::object x, std::uintptr_t stream, int kx, int ky, double sigma, double sigma_y, const std::string& border) {
        Input in = to_input(x, stream, "gaussian_blur");
        kernels::BlurArgs args{kx, ky, sigma, sigma_y, kernels::parse_border(border)};
        GF_CHECK_ARG(in.ref.dtype == DType::F32 || in.ref.dtype == DType::U8,
                     "gaussian_blur: unsupported {}: expected float32 or uint8", in.ref.describe());
        Output out = make_output(in.ref, in.ref.dtype, in.ref.shape);
        {
          py::gil_scoped_release nogil;
          kernels::gaussian_blur(in.ref, out.ref, args);
        }
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("ksize_x"), py::arg("ksize_y"), py::arg("sigma"), py::arg("sigma_y"),
      py::arg("border"));

  m.def(
      "_kernels_canny",
      [](py::object x, std::uintptr_t stream, double low, double high, bool l2) {
        Input in = to_input(x, stream, "canny");
        GF_CHECK_ARG(in.ref.dtype == DType::U8, "canny: unsupported {}: expected uint8 (as cv2.Canny)", in.ref.describe());
        Output out = make_output(in.ref, DType::U8, in.ref.shape);
        {
          py::gil_scoped_release nogil;
          kernels::canny(in.ref, out.ref, {low, high, l2});
        }
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("low"), py::arg("high"), py::arg("l2gradient"));

  m.def(
      "_kernels_kmeans1d",
      [](py::object x, std::uintptr_t stream, int k, const std::string& method, double sample,
         std::optional<std::uint64_t> seed, int n_init, int max_iter, double tol, bool per_image) {
        Input in = to_input(x, stream, "kmeans1d");
        kernels::KMeansArgs args;
        args.k = k;
        GF_CHECK_ARG(method == "exact" || method == "lloyd",
                     "kmeans1d: method='{}' is invalid: expected 'exact' (global optimum by dynamic programming) or "
                     "'lloyd' (k-means++ and Lloyd iterations, as scikit-learn)",
                     method);
        args.method = method == "exact" ? kernels::KMeansMethod::Exact : kernels::KMeansMethod::Lloyd;
        args.sample = sample;
        args.seed = seed;
        args.n_init = n_init;
        args.max_iter = max_iter;
        args.tol = tol;
        kernels::check_kmeans(in.ref, args);
        const std::int64_t problems = per_image && in.ref.ndim() == 3 ? in.ref.shape[0] : 1;
        Output labels = make_output(in.ref, DType::I32, in.ref.shape);
        Output centres = make_output(in.ref, DType::F64, {problems, k});
        Output inertia = make_output(in.ref, DType::F64, {problems});
        Output clusters = make_output(in.ref, DType::I32, {problems});
        {
          py::gil_scoped_release nogil;
          kernels::kmeans1d(in.ref, {labels.ref, centres.ref, inertia.ref, clusters.ref}, args, per_image);
        }
        return py::make_tuple(labels.obj, centres.obj, inertia.obj, clusters.obj);
      },
      py::arg("x"), py::arg("stream"), py::arg("k"), py::arg("method"), py::arg("sample"), py::arg("seed"),
      py::arg("n_init"), py::arg("max_iter"), py::arg("tol"), py::arg("per_image"));

  m.def(
      "_kernels_normalize_minmax",
      [](py::object x, std::uintptr_t stream, const std::string& dtype, std::int64_t groups) {
        Input in = to_input(x, stream, "normalize_minmax");
        GF_CHECK_ARG(dtype == "uint8" || dtype == "float32",
                     "normalize_minmax: dtype={} is not supported: expected uint8 or float32", dtype);
        Output out = make_output(in.ref, dtype == "uint8" ? DType::U8 : DType::F32, in.ref.shape);
        {
          py::gil_scoped_release nogil;
          kernels::normalize_minmax(in.ref, out.ref, groups);
        }
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("dtype"), py::arg("groups"));

  m.def(
      "_kernels_mean",
      [](py::object x, std::uintptr_t stream, std::int64_t groups) {
        Input in = to_input(x, stream, "mean");
        Output out = make_output(in.ref, DType::F64, {groups});
        {
          py::gil_scoped_release nogil;
          kernels::mean(in.ref, out.ref, groups);
        }
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("groups"));

  m.def(
      "_kernels_congestion_score",
      [](py::object x, std::uintptr_t stream, int k, double low, double high, int ksize, double sigma, bool fast,
         bool intermediates) {
        Input in = to_input(x, stream, "congestion_score");
        kernels::CongestionArgs args{k, low, high, ksize, sigma, fast};
        kernels::check_congestion(in.ref, args);
        const kernels::Batch b = kernels::as_batch(in.ref, "congestion_score(depth)");
        const std::vector<std::int64_t> nhw{b.n, b.h, b.w};
        Output scores = make_output(in.ref, DType::F64, {b.n});
        kernels::CongestionOut out;
        out.scores = scores.ref;
        py::dict inter;
        if (intermediates) {
          Output labels = make_output(in.ref, DType::I32, nhw), centres = make_output(in.ref, DType::F64, {b.n, k}),
                 normalized = make_output(in.ref, DType::U8, nhw), edges = make_output(in.ref, DType::U8, nhw);
          out.labels = labels.ref;
          out.centres = centres.ref;
          out.normalized = normalized.ref;
          out.edges = edges.ref;
          inter["labels"] = labels.obj;
          inter["centres"] = centres.obj;
          inter["normalized"] = normalized.obj;
          inter["edges"] = edges.obj;
          if (!fast) {
            Output blurred = make_output(in.ref, DType::F32, nhw);
            out.blurred = blurred.ref;
            inter["blurred"] = blurred.obj;
          }
        }
        {
          py::gil_scoped_release nogil;
          kernels::congestion_score(in.ref, out, args);
        }
        return py::make_tuple(scores.obj, inter);
      },
      py::arg("x"), py::arg("stream"), py::arg("k"), py::arg("low"), py::arg("high"), py::arg("ksize"),
      py::arg("sigma"), py::arg("fast"), py::arg("intermediates"));
}

}  // namespace gpufleet::bindings
