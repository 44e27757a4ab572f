// Bindings for csrc/kernels: converts NumPy arrays (CPU) and DLPack capsules (CUDA) to ArrayRef,
// allocates the outputs (NumPy arrays, or device memory handed back as a DLPack-exporting buffer),
// releases the GIL around the kernels, and keeps CUDA inputs and results alive as Note [Kernel result
// lifetimes] (kernels/device_memory.h) says. Python-side glue (array types, axes) is in
// gpufleet/kernels.py.
#include <pybind11/numpy.h>
#include <fmt/ranges.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/tensor_bindings.h"
#include "common/dlpack.h"
#include "common/error.h"
#include "kernels/array.h"
#include "kernels/device_memory.h"
#include "kernels/canny.h"
#include "kernels/congestion.h"
#include "kernels/gaussian_blur.h"
#include "kernels/kmeans1d.h"
#include "kernels/parallel.h"
#include "kernels/reduce.h"
#include "tensor/dlpack_exchange.h"
#include "tensor/stream.h"

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

gpufleet::DType tensor_dtype(DType t) {
  switch (t) {
    case DType::U8: return gpufleet::DType::UInt8;
    case DType::I32: return gpufleet::DType::Int32;
    case DType::I64: return gpufleet::DType::Int64;
    case DType::F32: return gpufleet::DType::Float32;
    case DType::F64: return gpufleet::DType::Float64;
  }
  return gpufleet::DType::UInt8;
}

// A device array owned by the kernels, exported through DLPack (the result type for CUDA inputs
// whose own library cannot import it, and what the input's library imports otherwise).
struct DLPackBuffer {
  Buffer buffer;

  std::pair<int, int> device() const {
    return {buffer.ref.device.is_cuda() ? kDLCUDA : kDLCPU, buffer.ref.device.is_cuda() ? buffer.ref.device.index : 0};
  }

  // The result as a gpufleet Tensor sharing its memory (and its lifetime: the view holds the storage).
  Tensor as_tensor() const {
    const Buffer b = buffer;
    const std::size_t bytes = static_cast<std::size_t>(b.ref.numel()) * kernels::dtype_size(b.ref.dtype);
    auto storage = wrap_storage(b.ref.data, bytes, b.ref.device, MemoryKind::Device, [keep = b.storage](void*) {});
    storage->set_stream_recorder([b](std::uintptr_t s) { kernels::record_stream(b, s); });
    const Shape shape(b.ref.shape.begin(), b.ref.shape.end());
    return Tensor(std::move(storage), 0, shape, contiguous_strides(shape), tensor_dtype(b.ref.dtype));
  }

  // Note [DLPack export]: a consumer's stream waits for the production event; a copy runs on the
  // current gpufleet stream once that stream has waited for it too.
  py::object dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy) const {
    const Buffer b = buffer;
    ExportSource src{as_tensor(), nullptr, nullptr};
    src.sync_for_consumer = [b](std::optional<std::int64_t> s) {
      kernels::consumer_wait(b, dlpack_consumer_stream(s));
    };
    src.before_copy = [b] {
      const Stream cur = current_stream(b.ref.device.index);
      kernels::consumer_wait(b, static_cast<std::intptr_t>(cur.handle()));
    };
    return export_dlpack(src, std::move(stream), std::move(max_version), std::move(dl_device), std::move(copy));
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
  Buffer buffer;  // CUDA
};

// Note [Kernel result lifetimes]: inputs read through DLPack, held until the kernels that read them
// have run. Touched with the GIL held only.
struct Held {
  std::shared_ptr<kernels::Production> done;
  py::object obj;
};
std::vector<Held>& held_inputs() {
  static auto* v = new std::vector<Held>();  // leaked: outlives finalization
  return *v;
}

// Releases the held inputs whose kernels have finished (all of them, waiting, with `wait`).
void release_held_inputs(bool wait) {
  // Taken out first: another thread may add to the list while the GIL is released below.
  std::vector<Held> pending = std::move(held_inputs());
  held_inputs().clear();
  std::vector<Held> keep;
  for (auto& h : pending) {
    try {
      if (wait) {
        py::gil_scoped_release nogil;
        kernels::wait_production(h.done);
      } else if (!kernels::production_done(h.done)) {
        keep.push_back(std::move(h));
      }
    } catch (...) {
      // The device cannot say the reads finished: keep the input alive for good rather than risk it.
      keep.push_back(std::move(h));
    }
  }
  auto& held = held_inputs();
  held.insert(held.end(), std::make_move_iterator(keep.begin()), std::make_move_iterator(keep.end()));
}

// One kernel call: its input, its outputs, and what happens once its work is queued.
class Call {
 public:
  Call(const py::object& x, std::uintptr_t stream, py::object stream_owner, const char* op)
      : in_(to_input(x, stream, op)), owner_(std::move(stream_owner)) {
    release_held_inputs(false);
  }
  const ArrayRef& in() const { return in_.ref; }

  Output output(DType dtype, std::vector<std::int64_t> shape) {
    Output o;
    if (in_.ref.device.is_cuda()) {
      o.buffer = kernels::allocate(in_.ref.device, dtype, shape, in_.ref.stream, hold_py_object(owner_));
      o.ref = o.buffer.ref;
      o.obj = py::cast(DLPackBuffer{o.buffer});
      buffers_.push_back(o.buffer);
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

  // Runs the kernels without the GIL; then (also when they throw: part of the work may be queued)
  // records the production event, gives it to the outputs and holds the input until it.
  template <class F>
  void run(F&& kernels_call) {
    std::exception_ptr error;
    {
      py::gil_scoped_release nogil;
      try {
        kernels_call();
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (in_.ref.device.is_cuda()) {
      auto done = kernels::record_production(in_.ref.device, in_.ref.stream);
      for (const auto& b : buffers_) kernels::set_produced(b, done);
      held_inputs().push_back({std::move(done), in_.keep_alive});
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  Input in_;
  py::object owner_;
  std::vector<Buffer> buffers_;
};

std::uintptr_t record_stream_handle(py::handle s) {
  std::uintptr_t h = 0;
  if (py::isinstance<Stream>(s)) h = s.cast<const Stream&>().handle();
  else if (py::hasattr(s, "cuda_stream")) h = s.attr("cuda_stream").cast<std::uintptr_t>();  // torch
  else if (py::hasattr(s, "ptr")) h = s.attr("ptr").cast<std::uintptr_t>();                  // cupy
  else if (PyLong_Check(s.ptr()) && !PyBool_Check(s.ptr())) h = s.cast<std::uintptr_t>();
  else
    throw TypeError_(fmt::format("record_stream: expected a stream (gpufleet.Stream, torch.cuda.Stream, "
                                 "cupy.cuda.Stream or a cudaStream_t as an int), got {}",
                                 py::repr(s).cast<std::string>()));
  GF_CHECK_ARG(h != 2, "record_stream: the per-thread default stream (2) names another stream in every thread; "
               "pass a stream that outlives the result");
  return h;
}

py::dict kernel_memory_stats_dict(py::handle device_like) {
  const int device = cuda_index_from_py(device_like, "gpufleet.kernels.memory_stats");
  release_held_inputs(false);
  py::dict d;
#if GPUFLEET_WITH_CUDA
  const kernels::KernelMemoryStats s = kernels::kernel_memory_stats(device);
  d["backend"] = s.backend;
  d["used_bytes"] = s.used_bytes;
  d["reserved_bytes"] = s.reserved_bytes;
  d["release_threshold"] = s.release_threshold;
  d["live_results"] = s.live_results;
  d["failed_releases"] = s.failed_releases;
#else
  (void)device;
  kernels::throw_no_cuda("kernel memory statistics");
#endif
  d["held_inputs"] = held_inputs().size();
  return d;
}

}  // namespace

void bind_kernels(py::module_& m) {
  py::class_<DLPackBuffer>(m, "KernelBuffer",
                           "A device array produced by gpufleet.kernels, exported through DLPack "
                           "(torch.from_dlpack / cupy.from_dlpack / np.from_dlpack accept it).")
      .def("__dlpack__", &DLPackBuffer::dlpack, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none(),
           "DLPack export (Note [DLPack export]): the consumer's stream waits for the kernels that wrote this "
           "result, whichever thread or stream is current now. dl_device=(1, 0) or copy=True copy on the current "
           "gpufleet stream (copy=False raises BufferError where a copy is needed).")
      .def("__dlpack_device__", &DLPackBuffer::device)
      .def("record_stream",
           [](const DLPackBuffer& b, py::handle s) { kernels::record_stream(b.buffer, record_stream_handle(s)); },
           py::arg("stream"),
           "Work on `stream` uses this result: its memory is released only after the work queued there by then "
           "(Note [Kernel result lifetimes]); the stream must still exist when the result is released.")
      .def_property_readonly("shape", [](const DLPackBuffer& b) { return py::tuple(py::cast(b.buffer.ref.shape)); })
      .def_property_readonly("dtype", [](const DLPackBuffer& b) { return std::string(kernels::dtype_name(b.buffer.ref.dtype)); })
      .def_property_readonly("device", [](const DLPackBuffer& b) { return b.buffer.ref.device; })
      .def("__repr__", [](const DLPackBuffer& b) { return fmt::format("KernelBuffer({})", b.buffer.ref.describe()); });

  m.def("_kernels_num_threads", &kernels::num_threads);
  m.def("_kernels_set_num_threads", &kernels::set_num_threads, py::arg("n"));
  m.def("_kernels_is_cuda", [](py::object x) { return is_cuda_object(x); });
  m.def("_kernels_memory_stats", &kernel_memory_stats_dict, py::arg("device") = py::none());
  m.def("_kernels_release_held", [] { release_held_inputs(true); },
        "Waits for the kernels still reading held inputs and releases them (at interpreter exit).");

  m.def(
      "_kernels_gaussian_blur",
      [](py::object x, std::uintptr_t stream, int kx, int ky, double sigma, double sigma_y, const std::string& border,
         py::object owner) {
        Call call(x, stream, owner, "gaussian_blur");
        kernels::BlurArgs args{kx, ky, sigma, sigma_y, kernels::parse_border(border)};
        GF_CHECK_ARG(call.in().dtype == DType::F32 || call.in().dtype == DType::U8,
                     "gaussian_blur: unsupported {}: expected float32 or uint8", call.in().describe());
        Output out = call.output(call.in().dtype, call.in().shape);
        call.run([&] { kernels::gaussian_blur(call.in(), out.ref, args); });
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("ksize_x"), py::arg("ksize_y"), py::arg("sigma"), py::arg("sigma_y"),
      py::arg("border"), py::arg("stream_owner") = py::none());

  m.def(
      "_kernels_canny",
      [](py::object x, std::uintptr_t stream, double low, double high, bool l2, py::object owner) {
        Call call(x, stream, owner, "canny");
        GF_CHECK_ARG(call.in().dtype == DType::U8, "canny: unsupported {}: expected uint8 (as cv2.Canny)",
                     call.in().describe());
        Output out = call.output(DType::U8, call.in().shape);
        call.run([&] { kernels::canny(call.in(), out.ref, {low, high, l2}); });
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("low"), py::arg("high"), py::arg("l2gradient"),
      py::arg("stream_owner") = py::none());

  m.def(
      "_kernels_kmeans1d",
      [](py::object x, std::uintptr_t stream, int k, const std::string& method, double sample,
         std::optional<std::uint64_t> seed, int n_init, int max_iter, double tol, bool per_image, py::object owner) {
        Call call(x, stream, owner, "kmeans1d");
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
        kernels::check_kmeans(call.in(), args);
        const std::int64_t problems = per_image && call.in().ndim() == 3 ? call.in().shape[0] : 1;
        Output labels = call.output(DType::I32, call.in().shape);
        Output centres = call.output(DType::F64, {problems, k});
        Output inertia = call.output(DType::F64, {problems});
        Output clusters = call.output(DType::I32, {problems});
        call.run([&] {
          kernels::kmeans1d(call.in(), {labels.ref, centres.ref, inertia.ref, clusters.ref}, args, per_image);
        });
        return py::make_tuple(labels.obj, centres.obj, inertia.obj, clusters.obj);
      },
      py::arg("x"), py::arg("stream"), py::arg("k"), py::arg("method"), py::arg("sample"), py::arg("seed"),
      py::arg("n_init"), py::arg("max_iter"), py::arg("tol"), py::arg("per_image"), py::arg("stream_owner") = py::none());

  m.def(
      "_kernels_normalize_minmax",
      [](py::object x, std::uintptr_t stream, const std::string& dtype, std::int64_t groups, py::object owner) {
        Call call(x, stream, owner, "normalize_minmax");
        GF_CHECK_ARG(dtype == "uint8" || dtype == "float32",
                     "normalize_minmax: dtype={} is not supported: expected uint8 or float32", dtype);
        Output out = call.output(dtype == "uint8" ? DType::U8 : DType::F32, call.in().shape);
        call.run([&] { kernels::normalize_minmax(call.in(), out.ref, groups); });
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("dtype"), py::arg("groups"), py::arg("stream_owner") = py::none());

  m.def(
      "_kernels_mean",
      [](py::object x, std::uintptr_t stream, std::int64_t groups, py::object owner) {
        Call call(x, stream, owner, "mean");
        Output out = call.output(DType::F64, {groups});
        call.run([&] { kernels::mean(call.in(), out.ref, groups); });
        return out.obj;
      },
      py::arg("x"), py::arg("stream"), py::arg("groups"), py::arg("stream_owner") = py::none());

  m.def(
      "_kernels_congestion_score",
      [](py::object x, std::uintptr_t stream, int k, double low, double high, int ksize, double sigma, bool fast,
         bool intermediates, py::object owner) {
        Call call(x, stream, owner, "congestion_score");
        kernels::CongestionArgs args{k, low, high, ksize, sigma, fast};
        kernels::check_congestion(call.in(), args);
        const kernels::Batch b = kernels::as_batch(call.in(), "congestion_score(depth)");
        const std::vector<std::int64_t> nhw{b.n, b.h, b.w};
        Output scores = call.output(DType::F64, {b.n});
        kernels::CongestionOut out;
        out.scores = scores.ref;
        py::dict inter;
        if (intermediates) {
          Output labels = call.output(DType::I32, nhw), centres = call.output(DType::F64, {b.n, k}),
                 normalized = call.output(DType::U8, nhw), edges = call.output(DType::U8, nhw);
          out.labels = labels.ref;
          out.centres = centres.ref;
          out.normalized = normalized.ref;
          out.edges = edges.ref;
          inter["labels"] = labels.obj;
          inter["centres"] = centres.obj;
          inter["normalized"] = normalized.obj;
          inter["edges"] = edges.obj;
          if (!fast) {
            Output blurred = call.output(DType::F32, nhw);
            out.blurred = blurred.ref;
            inter["blurred"] = blurred.obj;
          }
        }
        call.run([&] { kernels::congestion_score(call.in(), out, args); });
        return py::make_tuple(scores.obj, inter);
      },
      py::arg("x"), py::arg("stream"), py::arg("k"), py::arg("low"), py::arg("high"), py::arg("ksize"),
      py::arg("sigma"), py::arg("fast"), py::arg("intermediates"), py::arg("stream_owner") = py::none());
}

}  // namespace gpufleet::bindings
