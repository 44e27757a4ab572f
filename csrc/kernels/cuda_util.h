#pragma once
/// Helpers for the CUDA backends (include only from `*.cu` and `*_cuda.cpp`): error checks, the
/// device guard, DLPack stream values as cudaStream_t, stream-ordered scratch memory and uploads.
///
/// Note [No fmt in .cu files]: nvcc cannot compile fmt 9 in C++20 mode (its consteval format-string
/// checks and constexpr helpers fail), so `*.cu` files never include common/error.h. They use
/// GFK_CHECK_ARG / GFK_CUDA_TRY from here, which format "{}" placeholders with a small ostream-based
/// formatter and throw the same exception types (std::invalid_argument, gpufleet::CudaError, the
/// latter raised from array_cuda.cpp, compiled by the host compiler).
#include <cuda_runtime_api.h>

#include "kernels/launch_shape.h"

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace gpufleet::kernels {

/// Replaces each "{}" in `pattern` with the next argument (ostream formatting).
inline void format_into(std::ostringstream& os, std::string_view pattern) { os << pattern; }
template <class A, class... Rest>
void format_into(std::ostringstream& os, std::string_view pattern, const A& a, const Rest&... rest) {
  const auto at = pattern.find("{}");
  if (at == std::string_view::npos) {
    os << pattern;
    return;
  }
  os << pattern.substr(0, at) << a;
  format_into(os, pattern.substr(at + 2), rest...);
}
template <class... Args>
std::string format_message(std::string_view pattern, const Args&... args) {
  std::ostringstream os;
  format_into(os, pattern, args...);
  return os.str();
}

/// Throws gpufleet::CudaError naming the call, file, line and CUDA's message (clears the error first).
[[noreturn]] void raise_cuda_error(cudaError_t status, const char* expr, const char* file, int line);

}  // namespace gpufleet::kernels

#define GFK_CHECK_ARG(cond, ...)                                                                  \
  do {                                                                                            \
    if (!(cond)) throw std::invalid_argument(::gpufleet::kernels::format_message(__VA_ARGS__));   \
  } while (0)

#define GFK_CUDA_TRY(expr)                                                                        \
  do {                                                                                            \
    cudaError_t gfk_status_ = (expr);                                                             \
    if (gfk_status_ != cudaSuccess) ::gpufleet::kernels::raise_cuda_error(gfk_status_, #expr, __FILE__, __LINE__); \
  } while (0)

namespace gpufleet::kernels {

/// DLPack's stream values are CUDA's own handles: 1 is cudaStreamLegacy, 2 cudaStreamPerThread (the
/// calling thread's own: never keep it to use from another thread; Note [Kernel result lifetimes]).
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

/// Makes `device` current for the scope and restores the previous device (rmm's cuda_set_device_raii).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    GFK_CUDA_TRY(cudaGetDevice(&previous_));
    if (device >= 0 && device != previous_) {
      GFK_CUDA_TRY(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// Device memory of the current device from the kernels' backend (Note [Kernel memory backend] in
// device_memory.h; array_cuda.cpp). Scratch is stream-ordered: freed on `stream` after the work
// queued there, so no host synchronisation is needed.
void* scratch_alloc(std::size_t bytes, cudaStream_t stream);
void scratch_free(int device, void* p, cudaStream_t stream) noexcept;
/// Copies `bytes` from host memory into device memory `dst`, ordered on `stream`, through a pinned
/// staging block: the host never waits (no pageable copy), the block is reused once the copy ran.
void upload_async(void* dst, const void* src, std::size_t bytes, cudaStream_t stream);

/// Scratch memory for the scope of a launcher (freed on `stream` when the scope ends).
template <class T>
class Scratch {
 public:
  Scratch(std::size_t count, cudaStream_t stream) : stream_(stream) {
    GFK_CUDA_TRY(cudaGetDevice(&device_));
    ptr_ = static_cast<T*>(scratch_alloc(count * sizeof(T), stream));
  }
  ~Scratch() { scratch_free(device_, ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  int device_ = 0;
  cudaStream_t stream_;
};

/// Throws CudaError if the last launch failed (launch errors are reported without synchronising).
#define GF_CUDA_CHECK_LAUNCH() GFK_CUDA_TRY(cudaGetLastError())

/// A launch shape (launch_shape.h) as CUDA's dim3.
inline dim3 as_dim3(const Dim& d) { return dim3(d.x, d.y, d.z); }

}  // namespace gpufleet::kernels
