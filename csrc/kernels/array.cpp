// ArrayRef helpers (see array.h).
#include "kernels/array.h"

#include <fmt/format.h>

#include <cstdlib>
#include <new>

#include "common/error.h"

namespace gpufleet::kernels {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
  }
  return "?";
}

std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::U8: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::F32: return 4;
    case DType::F64: return 8;
  }
  return 1;
}

std::int64_t ArrayRef::numel() const {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

std::string ArrayRef::describe() const {
  std::string dims;
  for (std::size_t i = 0; i < shape.size(); ++i) dims += fmt::format("{}{}", i ? ", " : "", shape[i]);
  if (shape.size() == 1) dims += ",";
  return fmt::format("{} array of shape ({}) on {}", dtype_name(dtype), dims, device.str());
}

Batch as_batch(const ArrayRef& a, const char* what) {
  GF_CHECK_ARG(a.ndim() == 2 || a.ndim() == 3,
               "{}: expected an image (H, W) or a batch of images (N, H, W), got a {}", what, a.describe());
  Batch b;
  if (a.ndim() == 3) b.n = a.shape[0];
  b.h = a.shape[a.ndim() - 2];
  b.w = a.shape[a.ndim() - 1];
  GF_CHECK_ARG(b.n > 0 && b.h > 0 && b.w > 0, "{}: expected non-empty images, got a {}", what, a.describe());
  return b;
}

void throw_no_cuda(const char* op) {
  throw std::invalid_argument(fmt::format(
      "{}: the input is on a CUDA device but this gpufleet build has no CUDA support (build_info()['cuda'] "
      "is False); pass a CPU array or use a CUDA build",
      op));
}

#if !GPUFLEET_WITH_CUDA
void set_produced(const Buffer&, std::shared_ptr<Production>) {}
void consumer_wait(const Buffer& b, std::intptr_t) {
  if (b.ref.device.is_cuda()) throw_no_cuda("consumer_wait");
}
void record_stream(const Buffer& b, std::uintptr_t) {
  if (b.ref.device.is_cuda()) throw_no_cuda("record_stream");
}
#endif

Buffer allocate(Device device, DType dtype, std::vector<std::int64_t> shape, std::uintptr_t stream,
                std::shared_ptr<void> stream_owner) {
  if (device.is_cuda()) {
#if GPUFLEET_WITH_CUDA
    return allocate_cuda(device, dtype, std::move(shape), stream, std::move(stream_owner));
#else
    throw_no_cuda("allocate");
#endif
  }
  Buffer b;
  b.ref.dtype = dtype;
  b.ref.shape = std::move(shape);
  b.ref.device = Device::cpu();
  std::size_t bytes = static_cast<std::size_t>(b.ref.numel()) * dtype_size(dtype);
  void* p = std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64);
  if (!p) throw std::bad_alloc();
  b.storage = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  b.ref.data = p;
  return b;
}

}  // namespace gpufleet::kernels
