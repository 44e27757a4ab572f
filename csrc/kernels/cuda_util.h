#pragma once
/// Helpers for the CUDA backends (include only from `*.cu` and `*_cuda.cpp`): error checks, the
/// device guard, DLPack stream values as cudaStream_t, stream-ordered scratch memory.
///
/// Note [No fmt in .cu files]: nvcc cannot compile fmt 9 in C++20 mode (its consteval format-string
/// checks and constexpr helpers fail), so `*.cu` files never include common/error.h. They use
/// GFK_CHECK_ARG / GFK_CUDA_TRY from here, which format "{}" placeholders with a small ostream-based
/// formatter and throw the same exception types (std::invalid_argument, gpufleet::CudaError, the
/// latter raised from array_cuda.cpp, compiled by the host compiler).
#include <cuda_runtime_api.h>

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

/// DLPack's stream values are CUDA's own handles: 1 is cudaStreamLegacy, 2 cudaStreamPerThread.
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

/// Stream-ordered scratch memory: allocated on `stream`, freed on it when the scope ends (after the
/// work queued meanwhile), so no host synchronisation is needed.
template <class T>
class Scratch {
 public:
  Scratch(std::size_t count, cudaStream_t stream) : stream_(stream) {
    if (count) GFK_CUDA_TRY(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), count * sizeof(T), stream));
  }
  ~Scratch() {
    if (ptr_ && cudaFreeAsync(ptr_, stream_) != cudaSuccess) (void)cudaGetLastError();
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  cudaStream_t stream_;
};

/// Throws CudaError if the last launch failed (launch errors are reported without synchronising).
#define GF_CUDA_CHECK_LAUNCH() GFK_CUDA_TRY(cudaGetLastError())

inline unsigned grid_for(std::int64_t n, unsigned block, unsigned max_blocks = 65535u * 16u) {
  std::int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > max_blocks) g = max_blocks;
  return static_cast<unsigned>(g);
}

}  // namespace gpufleet::kernels
