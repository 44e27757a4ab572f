// DLPack export/import (Note [DLPack ownership]).
#include "tensor/dlpack_exchange.h"

#include "common/error.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"

namespace gpufleet {

// Note [DLPack ownership]: an exported tensor's manager_ctx is a heap Export holding a Tensor (which
// shares the Storage) and the shape/stride arrays the DLTensor points to; the deleter deletes it. It
// touches no Python object itself: a Storage that wraps a Python object (from_numpy) takes the GIL in
// its own deleter. An imported tensor's Storage calls the producer's deleter exactly once, when the
// last view of it dies, so the producer may be gone long before (its memory is kept by the capsule).

namespace {
template <class Managed>
struct Export {
  Managed managed{};
  Tensor tensor;
  Shape shape, strides;
};

template <class Managed>
Export<Managed>* make_export(const Tensor& t, bool host_as_cpu) {
  GF_CHECK_ARG(t.defined(), "cannot export an undefined tensor");
  if (t.device().is_cpu()) t.storage()->wait_pending();
  auto* e = new Export<Managed>();
  e->tensor = t;
  e->shape = t.shape();
  e->strides = t.strides();
  DLTensor& dl = e->managed.dl_tensor;
  dl.data = t.data_ptr();
  dl.device = dlpack_device(t);
  if (host_as_cpu && t.device().is_cpu()) dl.device = DLDevice{kDLCPU, 0};
  dl.ndim = t.ndim();
  dl.dtype = to_dlpack_dtype(t.dtype());
  dl.shape = e->shape.empty() ? nullptr : e->shape.data();
  dl.strides = e->strides.empty() ? nullptr : e->strides.data();
  dl.byte_offset = 0;
  e->managed.manager_ctx = e;
  e->managed.deleter = [](Managed* self) { delete static_cast<Export<Managed>*>(self->manager_ctx); };
  return e;
}

Tensor import_dltensor(const DLTensor& dl, std::function<void()> release, const DeleterCall& call) {
  auto run_release = [call, release]() {
    if (call)
      call(release);
    else
      release();
  };
  bool owned = false;  // true once a Storage owns the release
  try {
    GF_CHECK_ARG(dl.ndim >= 0 && dl.ndim <= 64, "DLPack tensor has an invalid ndim {}", dl.ndim);
    const DType dtype = from_dlpack_dtype(dl.dtype);
    Device device = Device::cpu();
    MemoryKind kind = MemoryKind::Pageable;
    switch (dl.device.device_type) {
      case kDLCPU: break;
      case kDLCUDAHost: kind = MemoryKind::Pinned; break;
      case kDLCUDA:
        device = Device::cuda(dl.device.device_id);
        kind = MemoryKind::Device;
#if GPUFLEET_WITH_CUDA
        cuda_backend::check_device(dl.device.device_id, "cannot import a DLPack tensor on a CUDA device");
#else
        throw_no_cuda(fmt::format("cannot import a DLPack tensor on {}", device.str()));
#endif
        break;
      default:
        throw TypeError_(fmt::format("unsupported DLPack device type {}: gpufleet imports kDLCPU (1), kDLCUDA (2) "
                                     "and kDLCUDAHost (3)",
                                     static_cast<int>(dl.device.device_type)));
    }
    Shape shape(dl.shape, dl.shape + dl.ndim);
    Shape strides = dl.strides ? Shape(dl.strides, dl.strides + dl.ndim) : contiguous_strides(shape);
    const std::int64_t numel = checked_numel(shape);
    std::int64_t last = 0;
    for (int i = 0; i < dl.ndim && numel > 0; ++i) {
      GF_CHECK_ARG(strides[i] >= 0 || shape[i] <= 1,
                   "DLPack tensor has negative strides ({}), which gpufleet tensors do not support; copy it first",
                   shape_str(strides));
      if (shape[i] > 1) last += (shape[i] - 1) * strides[i];
      else strides[i] = std::max<std::int64_t>(strides[i], 0);
    }
    const std::size_t item = itemsize(dtype);
    const std::size_t nbytes = numel > 0 ? static_cast<std::size_t>(last + 1) * item : 0;
    void* data = dl.data ? static_cast<char*>(dl.data) + dl.byte_offset : nullptr;
    GF_CHECK_ARG(data != nullptr || numel == 0, "DLPack tensor with {} elements has a NULL data pointer", numel);
    GF_CHECK_ARG(reinterpret_cast<std::uintptr_t>(data) % item == 0,
                 "DLPack tensor data at {} is not aligned to its {}-byte elements", data, item);
    auto storage = wrap_storage(data, nbytes, device, kind, [run_release](void*) { run_release(); });
    owned = true;
    return Tensor(std::move(storage), 0, std::move(shape), std::move(strides), dtype);
  } catch (...) {
    // Once a Storage owns the release, it ran when that Storage died during unwinding.
    if (!owned) run_release();
    throw;
  }
}
}  // namespace

DLDevice dlpack_device(const Tensor& t) {
  const Device& d = t.device();
  if (d.is_cuda()) return DLDevice{kDLCUDA, d.index};
  return DLDevice{t.is_pinned() ? kDLCUDAHost : kDLCPU, 0};
}

DLManagedTensor* to_dlpack(const Tensor& t, bool host_as_cpu) {
  return &make_export<DLManagedTensor>(t, host_as_cpu)->managed;
}

DLManagedTensorVersioned* to_dlpack_versioned(const Tensor& t, bool copied, bool host_as_cpu) {
  auto* e = make_export<DLManagedTensorVersioned>(t, host_as_cpu);
  e->managed.version = DLPackVersion{DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
  e->managed.flags = copied ? DLPACK_FLAG_BITMASK_IS_COPIED : 0;
  return &e->managed;
}

Tensor from_dlpack(DLManagedTensor* managed, const DeleterCall& call) {
  GF_CHECK_ARG(managed != nullptr, "from_dlpack: NULL DLManagedTensor");
  return import_dltensor(
      managed->dl_tensor, [managed] { if (managed->deleter) managed->deleter(managed); }, call);
}

Tensor from_dlpack(DLManagedTensorVersioned* managed, bool* read_only, const DeleterCall& call) {
  GF_CHECK_ARG(managed != nullptr, "from_dlpack: NULL DLManagedTensorVersioned");
  auto release = [managed] { if (managed->deleter) managed->deleter(managed); };
  if (managed->version.major != DLPACK_MAJOR_VERSION) {
    const auto major = managed->version.major;
    if (call) call(release); else release();
    throw std::invalid_argument(fmt::format("unsupported DLPack major version {} (gpufleet reads {})", major,
                                            DLPACK_MAJOR_VERSION));
  }
  if (read_only) *read_only = (managed->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
  return import_dltensor(managed->dl_tensor, release, call);
}

std::int64_t dlpack_consumer_stream(std::optional<std::int64_t> stream) {
  const std::int64_t s = stream.value_or(1);
  GF_CHECK_ARG(s != 0, "stream=0 is ambiguous and not allowed by the DLPack protocol: use 1 for the legacy default "
               "stream, 2 for the per-thread default stream, -1 for no synchronisation, or a cudaStream_t");
  GF_CHECK_ARG(s >= -1, "invalid stream {}: expected None, -1, 1, 2 or a cudaStream_t", s);
  return s;
}

void dlpack_sync_for_consumer(const Tensor& t, std::optional<std::int64_t> stream) {
  if (t.device().is_cpu()) {
    GF_CHECK_ARG(!stream, "stream must be None for a tensor in host memory, got {}", *stream);
    t.storage()->wait_pending();
    return;
  }
  const std::int64_t s = dlpack_consumer_stream(stream);
  if (s == -1) return;
  const int dev = t.device().index;
  const Stream producer = current_stream(dev);
  // Our default stream (handle 0) is the legacy default stream, which consumers name 1.
  if ((producer.is_default() && s == 1) || producer.handle() == static_cast<std::uintptr_t>(s)) return;
  Event e;
  e.record(producer);
  e.wait(Stream::external(dev, static_cast<std::uintptr_t>(s)));
}

}  // namespace gpufleet
