#pragma once
/// gpufleet::Tensor: a strided view of a reference-counted Storage, on the host or on a CUDA device,
/// with PyTorch's transfer semantics (`to` returns the tensor itself when nothing changes).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "device/device.h"
#include "tensor/dtype.h"
#include "tensor/storage.h"

namespace gpufleet {

using Shape = std::vector<std::int64_t>;
/// A fill value: integers stay exact (int64 beyond 2^53), floats are doubles.
using Scalar = std::variant<std::int64_t, double>;

/// "(2, 3)" in Python's tuple notation, for messages.
std::string shape_str(const Shape& shape);
/// Number of elements; throws std::invalid_argument for a negative size or an overflow.
std::int64_t checked_numel(const Shape& shape);
/// Row-major strides (in elements) of a compact tensor of this shape.
Shape contiguous_strides(const Shape& shape);

/// `cuda` without an index becomes `cuda:<current>`; `cpu:N` becomes `cpu`.
Device resolve_device(Device d);

/// Raises PyTorch's mixed-device error ("Expected all tensors to be on the same device, but found at
/// least two devices, cuda:0 and cpu!") when `a` and `b` differ; `op` is named in the message.
void check_same_device(const Device& a, const Device& b, const std::string& op);

class Stream;

class Tensor {
 public:
  Tensor() = default;
  /// A view of `storage`: `offset`, `strides` in elements. Checks that the view fits the storage.
  Tensor(std::shared_ptr<Storage> storage, std::int64_t offset, Shape shape, Shape strides, DType dtype);

  // ---- creation --------------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype, Device device, bool pinned = false);
  static Tensor zeros(const Shape& shape, DType dtype, Device device, bool pinned = false);
  static Tensor full(const Shape& shape, Scalar value, DType dtype, Device device, bool pinned = false);
  /// A compact tensor of `like`'s shape (strides are not kept), dtype and device unless given.
  static Tensor empty_like(const Tensor& like, std::optional<DType> dtype = std::nullopt,
                           std::optional<Device> device = std::nullopt);

  // ---- facts -----------------------------------------------------------------------------------
  bool defined() const noexcept { return storage_ != nullptr; }
  DType dtype() const noexcept { return dtype_; }
  const Device& device() const;
  const Shape& shape() const noexcept { return shape_; }
  const Shape& strides() const noexcept { return strides_; }
  int ndim() const noexcept { return static_cast<int>(shape_.size()); }
  std::int64_t size(int dim) const;
  std::int64_t numel() const noexcept { return numel_; }
  std::size_t itemsize() const { return gpufleet::itemsize(dtype_); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel_) * itemsize(); }
  std::int64_t storage_offset() const noexcept { return offset_; }
  /// Row-major compact (size-1 dimensions may have any stride, as in PyTorch).
  bool is_contiguous() const;
  bool is_pinned() const;
  bool is_cuda() const { return device().is_cuda(); }
  MemoryKind memory_kind() const;
  void* data_ptr() const;
  const std::shared_ptr<Storage>& storage() const noexcept { return storage_; }
  /// True when both tensors view the same storage.
  bool shares_storage_with(const Tensor& other) const { return storage_ && storage_ == other.storage_; }
  std::string str() const;  ///< "Tensor(shape=(2, 3), dtype=float32, device=cpu)"

  // ---- transfers -------------------------------------------------------------------------------
  /// PyTorch's rule: `*this` itself when the (resolved) device and dtype already match and `copy` is
  /// false; otherwise a new compact tensor. `non_blocking` makes copies from/to pinned memory
  /// asynchronous on the current stream (Note [non_blocking]).
  Tensor to(std::optional<Device> device, std::optional<DType> dtype = std::nullopt, bool non_blocking = false,
            bool copy = false) const;
  Tensor cpu(bool non_blocking = false) const { return to(Device::cpu(), std::nullopt, non_blocking); }
  Tensor cuda(std::optional<int> index = std::nullopt, bool non_blocking = false) const;
  /// A copy in pinned host memory (itself if already pinned). Needs the CUDA runtime.
  Tensor pin_memory() const;
  /// Itself if compact, else a compact copy on the same device.
  Tensor contiguous() const;
  /// A compact copy on the same device with the same dtype.
  Tensor clone() const;
  /// Copies `src` into this tensor (same shape; dtype converted; any devices). Returns *this.
  const Tensor& copy_(const Tensor& src, bool non_blocking = false) const;
  const Tensor& fill_(Scalar value) const;
  /// PyTorch's Tensor.record_stream (Note [record_stream] in allocator.h): the memory is not reused
  /// before the work queued on `stream` when this tensor's storage is freed has finished. `stream`
  /// must be a stream of this tensor's device and must still exist when the storage is freed.
  void record_stream(const Stream& stream) const;

  // ---- views (share storage) -------------------------------------------------------------------
  Tensor narrow(int dim, std::int64_t start, std::int64_t length) const;
  /// Python-style slice with step > 0; start/stop clamped as Python does.
  Tensor slice(int dim, std::optional<std::int64_t> start, std::optional<std::int64_t> stop, std::int64_t step) const;
  /// Removes dimension `dim` at `index` (negative indices count from the end).
  Tensor select(int dim, std::int64_t index) const;
  Tensor permute(const std::vector<int>& dims) const;
  Tensor transpose(int dim0, int dim1) const;
  /// A view when compact, else a compact copy reshaped. One size may be -1.
  Tensor reshape(Shape shape) const;
  /// A view with a new shape; requires a compact tensor.
  Tensor view(Shape shape) const;

  /// Normalises a possibly negative dimension; throws std::out_of_range naming it.
  int wrap_dim(int dim) const;

 private:
  std::shared_ptr<Storage> storage_;
  std::int64_t offset_ = 0;
  Shape shape_;
  Shape strides_;
  std::int64_t numel_ = 0;
  DType dtype_ = DType::Float32;
};

/// Concatenates tensors (same device, same dtype, same shape except along `dim`).
Tensor cat(const std::vector<Tensor>& tensors, int dim);

// ---- DataParallel-style helpers ------------------------------------------------------------------
/// DataParallel's chunking: ceil(n / k) per chunk, so fewer than k chunks when n is small
/// (n=5, k=4 gives 2, 2, 1). Throws for k < 1.
std::vector<std::int64_t> chunk_sizes(std::int64_t n, int k);
/// Splits `t` along `dim` and moves chunk i to devices[i]; `sizes` (must sum to the dimension)
/// overrides the chunking. Chunks that stay on `t`'s device are views. Returns one tensor per chunk
/// (fewer than devices when the dimension is small, as torch.cuda.comm.scatter does).
std::vector<Tensor> scatter(const Tensor& t, const std::vector<Device>& devices, int dim = 0,
                            const std::optional<std::vector<std::int64_t>>& sizes = std::nullopt);
/// Concatenates tensors from any devices along `dim` on `device`.
Tensor gather(const std::vector<Tensor>& tensors, Device device, int dim = 0);
/// A copy of `t` on each device.
std::vector<Tensor> broadcast(const Tensor& t, const std::vector<Device>& devices);

// ---- internals shared by the copy backends -------------------------------------------------------
namespace detail {
/// Strided copy with dtype conversion between host tensors of the same shape (no overlap).
void cpu_copy(const Tensor& dst, const Tensor& src);
/// Fills a host tensor.
void cpu_fill(const Tensor& dst, Scalar value);
}  // namespace detail

}  // namespace gpufleet
