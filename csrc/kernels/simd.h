#pragma once
/// GF_SIMD_CLONES: compile a hot loop three times, for x86-64-v4 (AVX-512 F/BW/DQ/VL: native
/// narrowing and masks on the same 256-bit vectors), AVX2 and the baseline, and pick at load time
/// (GCC function multi-versioning). No -march flag is needed, so the module still runs on any x86-64
/// CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__CUDACC__)
#define GF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define GF_SIMD_CLONES
#endif
