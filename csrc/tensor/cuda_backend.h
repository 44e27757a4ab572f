#pragma once
/// The CUDA slot of csrc/tensor (Note [Source conventions]): functions defined in `*_cuda.cpp` and
/// `*.cu` files, compiled only when CUDA is on. Front ends call them behind `#if GPUFLEET_WITH_CUDA`;
/// a CPU-only build calls throw_no_cuda() instead.
#include <cstddef>
#include <cstdint>
#include <string>

namespace gpufleet {

class Tensor;

/// Throws RuntimeError "gpufleet was built without CUDA: <what>" (CPU-only builds).
[[noreturn]] void throw_no_cuda(const std::string& what);

#if GPUFLEET_WITH_CUDA
namespace cuda_backend {
/// Throws "no CUDA device is available: ..." when the runtime sees no device (no driver, none
/// visible) and std::invalid_argument for an index beyond the device count. Never aborts.
void check_device(int index, const char* what);
int runtime_device_count();  ///< 0 when the runtime sees none (never throws)

void* raw_device_alloc(int device, std::size_t nbytes);  ///< nullptr when out of memory
void raw_device_free(int device, void* ptr);
/// Test hook: after `after` more successful calls, the next `count` raw_device_free calls throw
/// CudaError without freeing.
void inject_device_free_failures(int count, int after);
void* raw_pinned_alloc(std::size_t nbytes);  ///< nullptr when out of memory
void raw_pinned_free(void* ptr);

/// Copies between tensors of the same shape when at least one is on a CUDA device.
void copy(const Tensor& dst, const Tensor& src, bool non_blocking);
/// Zero-fills a CUDA tensor's bytes on the current stream (compact tensors).
void memset_zero(const Tensor& dst);

// Streams and events; handles are cudaStream_t / cudaEvent_t as integers.
std::uintptr_t stream_create(int device, int priority);
void stream_destroy(int device, std::uintptr_t stream);
void stream_synchronize(int device, std::uintptr_t stream);
bool stream_query(int device, std::uintptr_t stream);
void stream_wait_event(int device, std::uintptr_t stream, std::uintptr_t event);
std::uintptr_t event_create(int device, bool enable_timing);
void event_destroy(int device, std::uintptr_t event);  ///< device < 0: whatever device is current
void event_record(int device, std::uintptr_t event, std::uintptr_t stream);
void event_synchronize(std::uintptr_t event);
bool event_query(std::uintptr_t event);
float event_elapsed_ms(std::uintptr_t start, std::uintptr_t end);
void device_synchronize(int device);
/// Makes `consumer_stream` wait for the work queued so far on `producer_stream` (both on `device`).
void stream_wait_stream(int device, std::uintptr_t consumer_stream, std::uintptr_t producer_stream);

/// Device-side strided copy with dtype conversion (same device, same shape): copy_kernels.cu.
void launch_strided_copy(const Tensor& dst, const Tensor& src, std::uintptr_t stream);
}  // namespace cuda_backend
#endif

}  // namespace gpufleet
