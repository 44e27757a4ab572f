#pragma once
/// ArrayRef: the non-owning view of a compact (C-contiguous) array that every kernel takes, on the
/// CPU or on a CUDA device, plus the small helpers the front ends share.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device/device.h"

namespace gpufleet::kernels {

enum class DType : std::uint8_t { U8, I32, I64, F32, F64 };

/// "uint8", "int32", "int64", "float32", "float64" (NumPy's names).
const char* dtype_name(DType t);
std::size_t dtype_size(DType t);

/// A compact row-major array. `stream` is the cudaStream_t (as an integer) CUDA work on it is ordered
/// on; 0 is the legacy default stream. Unused on the CPU.
struct ArrayRef {
  void* data = nullptr;
  DType dtype = DType::U8;
  std::vector<std::int64_t> shape;
  Device device = Device::cpu();
  std::uintptr_t stream = 0;

  std::int64_t numel() const;
  int ndim() const { return static_cast<int>(shape.size()); }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
  /// e.g. "float32 array of shape (2, 3, 5) on cpu"
  std::string describe() const;
};

/// An image or a batch of images: (H, W) is one image, (N, H, W) a batch.
struct Batch {
  std::int64_t n = 1, h = 0, w = 0;
  std::int64_t plane() const { return h * w; }
};

/// Checks that `a` is (H, W) or (N, H, W) with non-empty images and returns its geometry; `what` names
/// the argument in the error ("canny(image)").
Batch as_batch(const ArrayRef& a, const char* what);

/// Memory owned by the kernels (device memory, or host memory), freed when the last reference goes.
/// Used for CUDA outputs and scratch. CUDA results carry their lifetime state (Note [Kernel result
/// lifetimes] in device_memory.h): the production event, the streams recorded as users.
struct ResultLifetime;
struct Buffer {
  std::shared_ptr<void> storage;
  ArrayRef ref;
  std::shared_ptr<ResultLifetime> lifetime;  ///< CUDA results only
};

class Production;

/// Allocates an uninitialised array on `device`. On CUDA the memory is for kernels queued on `stream`
/// (Note [Kernel result lifetimes]); `stream_owner`, when given, is held until the release and
/// guarantees that `stream` still exists then (the Python bindings pass the input library's stream
/// object). Throws ValueError for a CUDA device in a build without CUDA.
Buffer allocate(Device device, DType dtype, std::vector<std::int64_t> shape, std::uintptr_t stream = 0,
                std::shared_ptr<void> stream_owner = nullptr);

/// Throws ValueError saying CUDA is not compiled in (used by front ends in CPU-only builds).
[[noreturn]] void throw_no_cuda(const char* op);

// CUDA results (no-ops for host buffers):
/// Sets the event after which the result's contents are complete (record_production).
void set_produced(const Buffer& b, std::shared_ptr<Production> produced);
/// Makes the consumer's stream wait for the result's production (DLPack stream values: 1 legacy
/// default, 2 the calling thread's per-thread default stream, else a cudaStream_t; -1: no wait).
void consumer_wait(const Buffer& b, std::intptr_t consumer);
/// Records that work on `stream` uses the result: its release waits for the work queued there by then.
void record_stream(const Buffer& b, std::uintptr_t stream);

#if GPUFLEET_WITH_CUDA
/// Device memory helpers (array_cuda.cpp).
Buffer allocate_cuda(Device device, DType dtype, std::vector<std::int64_t> shape, std::uintptr_t stream,
                     std::shared_ptr<void> stream_owner);
#endif

}  // namespace gpufleet::kernels
