// Tensor: construction, views, transfers (the front end of the copy backends), multi-device helpers.
#include "tensor/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "common/error.h"
#include "tensor/cuda_backend.h"
#include "tensor/stream.h"

namespace gpufleet {

std::string shape_str(const Shape& shape) {
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);
  return fmt::format("({})", fmt::join(shape, ", "));
}

std::int64_t checked_numel(const Shape& shape) {
  std::int64_t n = 1;
  for (auto s : shape) {
    GF_CHECK_ARG(s >= 0, "invalid shape {}: sizes must be non-negative", shape_str(shape));
    if (s != 0 && n > std::numeric_limits<std::int64_t>::max() / 16 / s)
      throw std::invalid_argument(fmt::format("invalid shape {}: too many elements", shape_str(shape)));
    n *= s;
  }
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  std::int64_t acc = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= std::max<std::int64_t>(shape[i], 1);
  }
  return st;
}

Device resolve_device(Device d) {
  if (d.is_cpu()) return Device::cpu();
  if (!d.has_index()) return Device::cuda(current_cuda_index());
  return d;
}

void check_same_device(const Device& a, const Device& b, const std::string& op) {
  if (a == b) return;
  throw std::invalid_argument(fmt::format(
      "Expected all tensors to be on the same device, but found at least two devices, {} and {}! (in {})",
      a.str(), b.str(), op));
}

Tensor::Tensor(std::shared_ptr<Storage> storage, std::int64_t offset, Shape shape, Shape strides, DType dtype)
    : storage_(std::move(storage)), offset_(offset), shape_(std::move(shape)), strides_(std::move(strides)),
      dtype_(dtype) {
  GF_ASSERT(storage_ != nullptr, "tensor without storage");
  GF_CHECK_ARG(shape_.size() == strides_.size(), "shape {} and strides {} have different lengths",
               shape_str(shape_), shape_str(strides_));
  GF_CHECK_ARG(offset_ >= 0, "invalid storage offset {}", offset_);
  numel_ = checked_numel(shape_);
  if (numel_ > 0) {
    std::int64_t last = offset_;
    for (std::size_t i = 0; i < shape_.size(); ++i) {
      GF_CHECK_ARG(strides_[i] >= 0, "negative strides are not supported (strides {})", shape_str(strides_));
      last += (shape_[i] - 1) * strides_[i];
    }
    const auto cap = static_cast<std::int64_t>(storage_->nbytes() / gpufleet::itemsize(dtype_));
    GF_CHECK_ARG(last < cap, "a {} view with shape {}, strides {} and offset {} needs {} elements but its storage has {}",
                 dtype_name(dtype_), shape_str(shape_), shape_str(strides_), offset_, last + 1, cap);
  }
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device, bool pinned) {
  device = resolve_device(device);
  const std::int64_t n = checked_numel(shape);
  const std::size_t bytes = static_cast<std::size_t>(n) * gpufleet::itemsize(dtype);
  MemoryKind kind = MemoryKind::Device;
  if (device.is_cpu()) {
    kind = pinned ? MemoryKind::Pinned : MemoryKind::Pageable;
  } else {
    GF_CHECK_ARG(!pinned, "pin_memory=True only applies to CPU tensors, not to {}", device.str());
  }
  return Tensor(allocate_storage(bytes, device, kind), 0, shape, contiguous_strides(shape), dtype);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device, bool pinned) {
  Tensor t = empty(shape, dtype, device, pinned);
  t.fill_(std::int64_t{0});
  return t;
}

Tensor Tensor::full(const Shape& shape, Scalar value, DType dtype, Device device, bool pinned) {
  Tensor t = empty(shape, dtype, device, pinned);
  t.fill_(value);
  return t;
}

Tensor Tensor::empty_like(const Tensor& like, std::optional<DType> dtype, std::optional<Device> device) {
  return empty(like.shape(), dtype.value_or(like.dtype()), device.value_or(like.device()), false);
}

const Device& Tensor::device() const {
  GF_CHECK_ARG(storage_ != nullptr, "this tensor is undefined (default-constructed)");
  return storage_->device();
}

std::int64_t Tensor::size(int dim) const { return shape_[wrap_dim(dim)]; }

int Tensor::wrap_dim(int dim) const {
  const int n = ndim();
  if (dim < -n || dim >= n)
    throw std::out_of_range(fmt::format("dimension {} is out of range for a tensor with {} dimension{} (expected {} to {})",
                                        dim, n, n == 1 ? "" : "s", -n, n - 1));
  return dim < 0 ? dim + n : dim;
}

bool Tensor::is_contiguous() const {
  std::int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape_[i] == 0) return true;
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

bool Tensor::is_pinned() const { return storage_ && storage_->kind() == MemoryKind::Pinned; }
MemoryKind Tensor::memory_kind() const {
  (void)device();  // throws for an undefined tensor
  return storage_->kind();
}

void* Tensor::data_ptr() const {
  GF_CHECK_ARG(storage_ != nullptr, "this tensor is undefined (default-constructed)");
  if (!storage_->data()) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<std::int64_t>(itemsize());
}

std::string Tensor::str() const {
  return fmt::format("Tensor(shape={}, dtype={}, device={})", shape_str(shape_), dtype_name(dtype_), device().str());
}

// ---- transfers ----------------------------------------------------------------------------------
// Note [non_blocking]: copies are queued on the current stream of the CUDA device involved (the
// destination's for host->device and device->device, the source's for device->host). Without
// non_blocking the call waits for that stream, as PyTorch does. With non_blocking=True a copy from or
// to pinned memory returns at once; the host-side Storage records the copy (Note [Host reads wait for
// copies]). From or to pageable memory the CUDA runtime itself makes the copy synchronous with
// respect to the host buffer, so non_blocking only skips the final stream wait. A device->host
// `to(..., non_blocking=True)` allocates its result in pinned memory, as PyTorch does, so that it is
// truly asynchronous.
Tensor Tensor::to(std::optional<Device> device_opt, std::optional<DType> dtype, bool non_blocking, bool copy) const {
  const Device src = device();
  const Device target = device_opt ? resolve_device(*device_opt) : src;
  const DType dt = dtype.value_or(dtype_);
  if (!copy && target == src && dt == dtype_) return *this;
  const bool pin_out = non_blocking && src.is_cuda() && target.is_cpu();
  Tensor out = empty(shape_, dt, target, pin_out);
  out.copy_(*this, non_blocking);
  return out;
}

Tensor Tensor::cuda(std::optional<int> index, bool non_blocking) const {
  return to(Device::cuda(index.value_or(-1)), std::nullopt, non_blocking);
}

Tensor Tensor::pin_memory() const {
  GF_CHECK_ARG(device().is_cpu(), "cannot pin a tensor on {}: only CPU tensors can be pinned", device().str());
  if (is_pinned()) return *this;
  Tensor out = empty(shape_, dtype_, Device::cpu(), /*pinned=*/true);
  out.copy_(*this);
  return out;
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor out = empty(shape_, dtype_, device(), false);
  out.copy_(*this);
  return out;
}

const Tensor& Tensor::copy_(const Tensor& src, bool non_blocking) const {
  GF_CHECK_ARG(defined() && src.defined(), "copy_ needs two defined tensors");
  GF_CHECK_ARG(shape_ == src.shape_, "copy_: the source has shape {} but the destination has shape {}",
               shape_str(src.shape_), shape_str(shape_));
  if (numel_ == 0) return *this;
  if (device().is_cpu() && src.device().is_cpu()) {
    storage_->wait_pending();
    src.storage_->wait_pending();
    if (shares_storage_with(src)) {
      if (data_ptr() == src.data_ptr() && strides_ == src.strides_ && dtype_ == src.dtype_) return *this;
      detail::cpu_copy(*this, src.clone());  // may overlap: go through a copy
    } else {
      detail::cpu_copy(*this, src);
    }
    return *this;
  }
#if GPUFLEET_WITH_CUDA
  cuda_backend::copy(*this, src, non_blocking);
#else
  throw_no_cuda(fmt::format("cannot copy from {} to {}", src.device().str(), device().str()));
#endif
  return *this;
}

const Tensor& Tensor::fill_(Scalar value) const {
  GF_CHECK_ARG(defined(), "fill_ on an undefined tensor");
  if (numel_ == 0) return *this;
  if (device().is_cpu()) {
    storage_->wait_pending();
    detail::cpu_fill(*this, value);
    return *this;
  }
#if GPUFLEET_WITH_CUDA
  const bool zero = std::visit([](auto v) { return v == 0 && !std::signbit(static_cast<double>(v)); }, value);
  if (zero && is_contiguous()) {
    cuda_backend::memset_zero(*this);
  } else {
    copy_(full(shape_, value, dtype_, Device::cpu()));
  }
#else
  throw_no_cuda(fmt::format("cannot fill a tensor on {}", device().str()));
#endif
  return *this;
}

void Tensor::record_stream(const Stream& stream) const {
  GF_CHECK_ARG(defined(), "record_stream on an undefined tensor");
  GF_CHECK_ARG(device().is_cuda(), "record_stream needs a CUDA tensor, got one on {}", device().str());
  GF_CHECK_ARG(stream.device() == device().index, "record_stream: the stream is on cuda:{} but the tensor is on {}",
               stream.device(), device().str());
  storage_->record_stream(stream.handle());
}

// ---- views --------------------------------------------------------------------------------------
Tensor Tensor::narrow(int dim, std::int64_t start, std::int64_t length) const {
  const int d = wrap_dim(dim);
  const std::int64_t n = shape_[d];
  if (start < 0) start += n;
  GF_CHECK_ARG(start >= 0 && length >= 0 && start + length <= n,
               "narrow: start {} and length {} do not fit dimension {} of size {}", start, length, dim, n);
  Shape shape = shape_;
  shape[d] = length;
  return Tensor(storage_, offset_ + (length > 0 ? start * strides_[d] : 0), shape, strides_, dtype_);
}

Tensor Tensor::slice(int dim, std::optional<std::int64_t> start, std::optional<std::int64_t> stop,
                     std::int64_t step) const {
  const int d = wrap_dim(dim);
  GF_CHECK_ARG(step > 0, "slice step must be positive, got {}", step);
  const std::int64_t n = shape_[d];
  auto clamp = [n](std::optional<std::int64_t> v, std::int64_t dflt) {
    if (!v) return dflt;
    std::int64_t x = *v < 0 ? *v + n : *v;
    return std::clamp<std::int64_t>(x, 0, n);
  };
  const std::int64_t b = clamp(start, 0), e = std::max(clamp(stop, n), b);
  const std::int64_t len = (e - b + step - 1) / step;
  Shape shape = shape_, strides = strides_;
  shape[d] = len;
  strides[d] = strides_[d] * step;
  return Tensor(storage_, offset_ + (len > 0 ? b * strides_[d] : 0), shape, strides, dtype_);
}

Tensor Tensor::select(int dim, std::int64_t index) const {
  const int d = wrap_dim(dim);
  const std::int64_t n = shape_[d];
  if (index < -n || index >= n)
    throw std::out_of_range(fmt::format("index {} is out of bounds for dimension {} with size {}", index, dim, n));
  if (index < 0) index += n;
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return Tensor(storage_, offset_ + index * strides_[d], shape, strides, dtype_);
}

Tensor Tensor::permute(const std::vector<int>& dims) const {
  GF_CHECK_ARG(static_cast<int>(dims.size()) == ndim(), "permute: got {} dimensions for a tensor with {}", dims.size(), ndim());
  std::vector<bool> seen(ndim(), false);
  Shape shape(ndim()), strides(ndim());
  for (int i = 0; i < ndim(); ++i) {
    const int d = wrap_dim(dims[i]);
    GF_CHECK_ARG(!seen[d], "permute: dimension {} appears twice in ({})", d, fmt::join(dims, ", "));
    seen[d] = true;
    shape[i] = shape_[d];
    strides[i] = strides_[d];
  }
  return Tensor(storage_, offset_, shape, strides, dtype_);
}

Tensor Tensor::transpose(int dim0, int dim1) const {
  std::vector<int> dims(ndim());
  std::iota(dims.begin(), dims.end(), 0);
  std::swap(dims[wrap_dim(dim0)], dims[wrap_dim(dim1)]);
  return permute(dims);
}

namespace {
Shape infer_shape(Shape shape, std::int64_t numel) {
  int infer = -1;
  std::int64_t known = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      GF_CHECK_ARG(infer < 0, "only one dimension can be -1 in shape {}", shape_str(shape));
      infer = static_cast<int>(i);
    } else {
      GF_CHECK_ARG(shape[i] >= 0, "invalid shape {}", shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    GF_CHECK_ARG(known != 0 && numel % known == 0, "shape {} is invalid for input of size {}", shape_str(shape), numel);
    shape[infer] = numel / known;
  }
  GF_CHECK_ARG(checked_numel(shape) == numel, "shape {} is invalid for input of size {}", shape_str(shape), numel);
  return shape;
}
}  // namespace

Tensor Tensor::view(Shape shape) const {
  shape = infer_shape(std::move(shape), numel_);
  GF_CHECK_ARG(is_contiguous(), "view needs a contiguous tensor (this one has shape {} and strides {}); use reshape()",
               shape_str(shape_), shape_str(strides_));
  return Tensor(storage_, offset_, shape, contiguous_strides(shape), dtype_);
}

Tensor Tensor::reshape(Shape shape) const { return contiguous().view(std::move(shape)); }

// ---- several tensors ----------------------------------------------------------------------------
namespace {
Shape joined_shape(const std::vector<Tensor>& tensors, int dim, const char* op, int* wrapped) {
  GF_CHECK_ARG(!tensors.empty(), "{} needs at least one tensor", op);
  const Tensor& first = tensors[0];
  GF_CHECK_ARG(first.ndim() > 0, "{} cannot join zero-dimensional tensors", op);
  const int d = first.wrap_dim(dim);
  Shape shape = first.shape();
  shape[d] = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    GF_CHECK_ARG(t.defined(), "{}: tensor {} is undefined", op, i);
    GF_CHECK_ARG(t.dtype() == first.dtype(), "{}: tensor {} has dtype {} but tensor 0 has dtype {}", op, i,
                 dtype_name(t.dtype()), dtype_name(first.dtype()));
    bool ok = t.ndim() == first.ndim();
    for (int k = 0; ok && k < t.ndim(); ++k) ok = k == d || t.shape()[k] == first.shape()[k];
    GF_CHECK_ARG(ok, "{}: tensor {} has shape {}, which does not match tensor 0's shape {} outside dimension {}", op,
                 i, shape_str(t.shape()), shape_str(first.shape()), d);
    shape[d] += t.shape()[d];
  }
  *wrapped = d;
  return shape;
}

Tensor join_into(const std::vector<Tensor>& tensors, int d, Shape shape, Device device) {
  Tensor out = Tensor::empty(shape, tensors[0].dtype(), device);
  std::int64_t off = 0;
  for (const auto& t : tensors) {
    out.narrow(d, off, t.shape()[d]).copy_(t);
    off += t.shape()[d];
  }
  return out;
}
}  // namespace

Tensor cat(const std::vector<Tensor>& tensors, int dim) {
  int d = 0;
  Shape shape = joined_shape(tensors, dim, "cat", &d);
  for (const auto& t : tensors) check_same_device(tensors[0].device(), t.device(), "cat");
  return join_into(tensors, d, shape, tensors[0].device());
}

std::vector<std::int64_t> chunk_sizes(std::int64_t n, int k) {
  GF_CHECK_ARG(k >= 1, "cannot split into {} chunks: expected at least one device", k);
  GF_CHECK_ARG(n >= 0, "cannot split a dimension of size {}", n);
  if (n == 0) return {0};
  const std::int64_t chunk = (n + k - 1) / k;
  std::vector<std::int64_t> out;
  for (std::int64_t left = n; left > 0; left -= chunk) out.push_back(std::min(chunk, left));
  return out;
}

std::vector<Tensor> scatter(const Tensor& t, const std::vector<Device>& devices, int dim,
                            const std::optional<std::vector<std::int64_t>>& sizes) {
  GF_CHECK_ARG(t.defined(), "scatter needs a defined tensor");
  GF_CHECK_ARG(!devices.empty(), "scatter needs at least one device");
  GF_CHECK_ARG(t.ndim() > 0, "scatter cannot split a zero-dimensional tensor");
  const int d = t.wrap_dim(dim);
  const std::int64_t n = t.shape()[d];
  std::vector<std::int64_t> parts;
  if (sizes) {
    GF_CHECK_ARG(sizes->size() == devices.size(), "scatter: {} chunk sizes given for {} devices", sizes->size(),
                 devices.size());
    std::int64_t sum = 0;
    for (auto s : *sizes) {
      GF_CHECK_ARG(s >= 0, "scatter: chunk sizes must be non-negative, got [{}]", fmt::join(*sizes, ", "));
      sum += s;
    }
    GF_CHECK_ARG(sum == n, "scatter: chunk sizes [{}] sum to {} but dimension {} has size {}", fmt::join(*sizes, ", "),
                 sum, d, n);
    parts = *sizes;
  } else {
    parts = chunk_sizes(n, static_cast<int>(devices.size()));
  }
  std::vector<Tensor> out;
  std::int64_t off = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    out.push_back(t.narrow(d, off, parts[i]).to(devices[i]));
    off += parts[i];
  }
  return out;
}

Tensor gather(const std::vector<Tensor>& tensors, Device device, int dim) {
  int d = 0;
  Shape shape = joined_shape(tensors, dim, "gather", &d);
  return join_into(tensors, d, shape, resolve_device(device));
}

std::vector<Tensor> broadcast(const Tensor& t, const std::vector<Device>& devices) {
  GF_CHECK_ARG(t.defined(), "broadcast needs a defined tensor");
  GF_CHECK_ARG(!devices.empty(), "broadcast needs at least one device");
  std::vector<Tensor> out;
  for (const auto& dev : devices) out.push_back(t.to(dev, std::nullopt, false, /*copy=*/true));
  return out;
}

}  // namespace gpufleet
