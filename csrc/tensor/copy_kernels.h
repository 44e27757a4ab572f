#pragma once
/// The device-side strided copy kernel's launcher, kept free of fmt and of Tensor so that nvcc
/// compiles it (fmt's consteval format strings do not build under nvcc). copy_cuda.cpp prepares the
/// geometry and checks the result.
#include <cstdint>

#include "tensor/dtype.h"

namespace gpufleet::cuda_backend {

inline constexpr int kMaxCopyDims = 8;

/// Merged dimensions, index 0 innermost; strides in elements.
struct CopyGeometry {
  int ndim = 0;
  std::int64_t sizes[kMaxCopyDims] = {};
  std::int64_t dst_strides[kMaxCopyDims] = {};
  std::int64_t src_strides[kMaxCopyDims] = {};
};

/// Queues the conversion kernel on `stream` (a cudaStream_t); returns the cudaError_t of the launch.
int launch_strided_copy_kernel(void* dst, DType dst_dtype, const void* src, DType src_dtype, const CopyGeometry& g,
                               std::int64_t n, void* stream);

}  // namespace gpufleet::cuda_backend
