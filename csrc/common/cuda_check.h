#pragma once
/// GF_CUDA_TRY(expr): run a CUDA runtime call; on failure clear the sticky-free error state with
/// cudaGetLastError() and throw gpufleet::CudaError naming the call, file, line and CUDA's message.
/// Only include from files compiled with CUDA (`*.cu`, `*_cuda.cpp`).
#include <cuda_runtime_api.h>

#include "common/error.h"

#define GF_CUDA_TRY(expr)                                                                      \
  do {                                                                                         \
    cudaError_t gf_status_ = (expr);                                                           \
    if (gf_status_ != cudaSuccess) {                                                           \
      (void)cudaGetLastError();                                                                \
      throw ::gpufleet::CudaError(                                                             \
          fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(gf_status_),       \
                      cudaGetErrorString(gf_status_), #expr, __FILE__, __LINE__),              \
          static_cast<int>(gf_status_));                                                       \
    }                                                                                          \
  } while (0)
