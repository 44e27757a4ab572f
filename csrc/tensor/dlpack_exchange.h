#pragma once
/// DLPack exchange without Python: exporting a Tensor as a managed DLPack tensor and importing one.
/// The capsule protocol (names, stream argument, BufferError) lives in bindings/bind_tensor.cpp.
#include <cstdint>
#include <functional>
#include <optional>

#include "common/dlpack.h"
#include "tensor/tensor.h"

namespace gpufleet {

/// (device_type, device_id) as `__dlpack_device__` reports it: kDLCPU for pageable host memory,
/// kDLCUDAHost for pinned host memory, kDLCUDA for device memory.
DLDevice dlpack_device(const Tensor& t);

/// Exports `t` (strides always filled). The returned object keeps the storage alive until its
/// deleter is called; call the deleter exactly once. Waits for pending host copies first.
/// `host_as_cpu` labels pinned host memory kDLCPU (for a consumer that asked for dl_device=(1, 0)).
DLManagedTensor* to_dlpack(const Tensor& t, bool host_as_cpu = false);
/// Same, versioned (DLPack 1.0). `copied` sets DLPACK_FLAG_BITMASK_IS_COPIED.
DLManagedTensorVersioned* to_dlpack_versioned(const Tensor& t, bool copied = false, bool host_as_cpu = false);

/// Runs a producer's deleter; the bindings pass one that takes the GIL and skips the call after the
/// interpreter is gone. Empty: call it directly.
using DeleterCall = std::function<void(const std::function<void()>&)>;

/// Takes ownership of a producer's tensor in ALL cases: the result views the producer's memory (no
/// copy) and calls the deleter when its storage dies; on error the deleter is called before the
/// exception propagates. `read_only` (versioned only) receives the producer's READ_ONLY flag.
Tensor from_dlpack(DLManagedTensor* managed, const DeleterCall& call = {});
Tensor from_dlpack(DLManagedTensorVersioned* managed, bool* read_only = nullptr, const DeleterCall& call = {});

/// The stream rule of `__dlpack__`: makes `t`'s data ready on the consumer's `stream` (None/1: legacy
/// default, 2: per-thread default, >2: a cudaStream_t, -1: no synchronisation; 0 is invalid). For a
/// host tensor `stream` must be None. Throws std::invalid_argument naming a bad value.
///
/// What the consumer waits for is the work queued so far on the *current* gpufleet stream of the
/// tensor's device in the calling thread, not on whichever stream last wrote the tensor (gpufleet does
/// not track writers): PyTorch's rule for torch.Tensor.__dlpack__. A tensor written on another stream
/// must be synchronised, or that stream made current, before the export.
void dlpack_sync_for_consumer(const Tensor& t, std::optional<std::int64_t> stream);

/// A device export's consumer stream argument checked and resolved (None -> 1); -1 means no wait.
/// Throws std::invalid_argument for 0 (ambiguous in DLPack) and values below -1.
std::int64_t dlpack_consumer_stream(std::optional<std::int64_t> stream);

}  // namespace gpufleet
