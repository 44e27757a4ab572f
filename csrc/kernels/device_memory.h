#pragma once
/// Device memory of the CUDA kernels: where scratch and results come from, and when a result's
/// memory may be reused.
///
/// Note [Kernel memory backend]: each device gets one backend, chosen once by choose_memory_backend:
/// - "pool": gpufleet's own CUDA memory pool (cudaMemPoolCreate; stream-ordered cudaMallocFromPoolAsync
///   / cudaFreeAsync), with its release threshold at UINT64_MAX so that the memory freed at every
///   synchronisation stays in the pool instead of going back to the driver (the default pool's
///   threshold of 0 returns it all at each sync); gpufleet.empty_cache() trims it.
/// - "caching": gpufleet's tensor caching allocator (cudaMalloc, csrc/tensor/allocator.h) for devices
///   or drivers without memory pools (cudaDevAttrMemoryPoolsSupported is 0: some vGPU, WSL and MPS
///   setups), or when GPUFLEET_KERNELS_MEMORY=caching asks for it.
///
/// Note [Kernel result lifetimes]: a result (a KernelBuffer, or the CuPy/PyTorch array made from it)
/// is written by kernels queued on the caller's stream S. When the call has queued its work, an event
/// E is recorded on S ("production"). Then:
/// - an export (__dlpack__(stream=C)) makes C wait for E, not for a fresh event of "S": S may be the
///   per-thread default stream (2), which names another stream in every thread, and E is also correct
///   once S itself is gone;
/// - the result's memory is released on a stream gpufleet owns (one per device, never destroyed),
///   after waiting for: an event recorded on S at the release when S is known to exist then and to be
///   the same stream (the legacy default stream; a stream whose owner the result holds: the Python
///   bindings keep the input library's stream object, so a CuPy stream is not destroyed before the
///   results made on it; the per-thread default stream only when released in the producing thread),
///   else E; and an event on each stream named with record_stream. So the memory is reused neither before the work queued on S up to the
///   release (as for an array that library allocated on S) nor, when S is gone, before the kernels
///   that wrote it; S itself is never touched once it may be gone.
/// - Work on a stream other than S that uses the result must be recorded with
///   KernelBuffer.record_stream(s) (and s must exist at the release) or finish before the release:
///   PyTorch's rule for its own tensors (Tensor.record_stream).
/// - Inputs read through DLPack are held (their capsule, hence the producer's array) until E has
///   completed (bindings/bind_kernels.cpp), so the producer cannot reuse their memory while the
///   kernels still read it, whichever stream it was allocated on.
#include <cstdint>
#include <memory>
#include <string>

#include "device/device.h"

namespace gpufleet::kernels {

enum class MemoryBackend : std::uint8_t { AsyncPool, Caching };

/// The backend for a device (Note [Kernel memory backend]). `override_value` is the value of
/// GPUFLEET_KERNELS_MEMORY: null, "" or "auto" (pools where supported), "pool" (an error where they
/// are not), "caching". Throws std::invalid_argument naming a bad value.
MemoryBackend choose_memory_backend(bool pools_supported, const char* override_value);
const char* memory_backend_name(MemoryBackend b);

/// The pool's release threshold (bytes kept across synchronisations).
inline constexpr std::uint64_t kPoolReleaseThreshold = ~std::uint64_t{0};

struct KernelMemoryStats {
  std::string backend;                  ///< "pool", "caching", or "" if the device never allocated
  std::uint64_t used_bytes = 0;      ///< in allocations not yet freed (caching: the allocator's, tensors included)
  std::uint64_t reserved_bytes = 0;  ///< obtained from the driver
  std::uint64_t release_threshold = 0;
  std::uint64_t live_results = 0;       ///< results allocated and not yet released
  std::uint64_t failed_releases = 0;    ///< CUDA errors while releasing a result (should stay 0)
};

/// An event recorded on a stream once a kernel call has queued its work (Note [Kernel result
/// lifetimes]). Null for CPU calls.
class Production;
std::shared_ptr<Production> record_production(Device device, std::uintptr_t stream);
/// True once the recorded work has finished (true for null).
bool production_done(const std::shared_ptr<Production>& p);
/// Blocks until it has finished.
void wait_production(const std::shared_ptr<Production>& p);

#if GPUFLEET_WITH_CUDA
KernelMemoryStats kernel_memory_stats(int device);
/// Returns the unused memory of every kernel pool to the driver (gpufleet.empty_cache()).
void trim_kernel_memory();
#endif

}  // namespace gpufleet::kernels
