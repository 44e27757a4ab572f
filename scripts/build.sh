#!/usr/bin/env bash
# Configures (once) and builds one flavour of gpufleet in build/<flavour>:
#   cuda    CUDA backends when nvcc is found (GPUFLEET_CUDA=AUTO), Python module + C++ tests
#   nocuda  GPUFLEET_CUDA=OFF, Python module + C++ tests: the same Python API, zero CUDA devices
#   asan    GPUFLEET_CUDA=OFF, C++ tests only, AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan    GPUFLEET_CUDA=OFF, C++ tests only, ThreadSanitizer; only the threaded parts' tests are built
#           (test_dispatch, test_pipeline: the run loop, launcher threads, supervisor, queues)
#   fuzz    clang: the libFuzzer targets of the parsers only (tests/fuzz/README.md)
# BUILD_ROOT (default build) lets several checkouts or people build side by side.
# The Python package is staged in build/<flavour>/stage (Note [Staged package] in CMakeLists.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:?usage: scripts/build.sh cuda|nocuda|asan|tsan}
targets=()
VENV=${VENV:-.venv}
dir=${BUILD_ROOT:-build}/$flavour
jobs=${JOBS:-$(nproc)}
case "$flavour" in
  cuda)   flags=(-DGPUFLEET_CUDA=AUTO -DGPUFLEET_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release) ;;
  nocuda) flags=(-DGPUFLEET_CUDA=OFF -DGPUFLEET_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release) ;;
  # asan: line tables (-g1) suffice for ASan reports and compile faster than full debug info
  asan)   flags=(-DGPUFLEET_CUDA=OFF -DGPUFLEET_BUILD_TESTS=ON -DGPUFLEET_BUILD_PYTHON=OFF
                 -DGPUFLEET_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
                 "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1") ;;
  tsan)   flags=(-DGPUFLEET_CUDA=OFF -DGPUFLEET_BUILD_TESTS=ON -DGPUFLEET_BUILD_PYTHON=OFF
                 -DGPUFLEET_TSAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1")
          targets=(--target test_dispatch test_dispatch_queue test_pipeline) ;;
  # fuzz: libFuzzer targets of the parsers (tests/fuzz), clang with ASan + UBSan
  fuzz)   export CC=${FUZZ_CC:-clang} CXX=${FUZZ_CXX:-clang++}
          flags=(-DGPUFLEET_CUDA=OFF -DGPUFLEET_FUZZ=ON -DGPUFLEET_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
                 "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1") ;;
  *) echo "unknown flavour '$flavour': expected cuda, nocuda, asan, tsan or fuzz" >&2; exit 2 ;;
esac
# A compiler cache (ccache, from Debian) when there is one: rebuilds after a clean clone or in another
# checkout reuse the objects (CCACHE_BASEDIR makes the cache keys independent of the checkout's path).
if command -v ccache >/dev/null; then
  flags+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
fi
if [ -n "${CUDA_ARCHITECTURES:-}" ]; then flags+=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES"); fi
if [ ! -f "$dir/build.ninja" ]; then
  "$VENV/bin/cmake" -Wno-unused-cli -S . -B "$dir" -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/$VENV/bin/ninja" \
    -DPython_EXECUTABLE="$PWD/$VENV/bin/python" \
    -Dpybind11_DIR="$("$VENV/bin/python" -m pybind11 --cmakedir)" "${flags[@]}" >/dev/null
fi
"$VENV/bin/cmake" --build "$dir" -j "$jobs" "${targets[@]}"
