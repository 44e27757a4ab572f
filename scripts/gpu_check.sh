#!/usr/bin/env bash
# Every GPU check in one command, for a machine with an NVIDIA GPU and no package registry (the
# device machine: python3 with torch, cupy, numpy, pybind11, opencv, cmake, ninja and nvcc):
#
#   scripts/gpu_check.sh [build] [test] [sanitize] [bench]      (default: all four, in this order)
#
# The device tool runs a command for at most 10 minutes: on a fresh machine give each step its own call
# (build/gpu stays on the warm machine between calls). The step timeouts below keep each under that.
#
#   build     build/gpu: CUDA for the local GPU's architecture, Release, the C++ tests
#   test      CTest, then the pytest files that hold GPU tests (PyTorch and CuPy interop included;
#             test_cuda_contract.py and test_cuda_lifetimes.py: issue 17's checks)
#   sanitize  compute-sanitizer memcheck over the CUDA kernels', tensors' and lifetimes' tests, racecheck and
#             synccheck over the shared-memory kernels
#   bench     gpufleet info, benchmarks/transfer_bench.py --quick, benchmarks/kernels_gpu.py
#
# Logs go to $OUT (the device tool's output folder) or /tmp/gpu_check: summary.txt (each step's exit
# status and seconds, nvidia-smi), build.log, ctest.log, pytest.log, sanitize.log, bench.log.
# Headers the machine lacks (fmt, nlohmann_json, SQLite, GoogleTest) come from .devdeps/, made here
# by scripts/device_deps.sh and carried along; they are unpacked into a private prefix, never into /.
# PYTHON, CMAKE, NINJA, CUDACXX and CUDA_ARCHITECTURES override what is found.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
summary="$out/summary.txt"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)

abs() { local p; p=$(command -v "$1" || echo "$1"); case $p in /*) echo "$p" ;; *) echo "$PWD/$p" ;; esac; }
export PY; PY=$(abs "${PYTHON:-python3}")
bindir=$(dirname "$PY")
export CMAKE; CMAKE=$(abs "${CMAKE:-$(command -v cmake || echo "$bindir/cmake")}")
export NINJA; NINJA=$(abs "${NINJA:-$(command -v ninja || echo "$bindir/ninja")}")
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ -z "${CUDA_ARCHITECTURES:-}" ]; then
  CUDA_ARCHITECTURES=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
fi
export CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-90}
export JOBS=${JOBS:-$(nproc)}

if [ -d .devdeps ]; then
  prefix=/tmp/gpufleet-devdeps
  mkdir -p "$prefix"
  for f in .devdeps/*.deb; do
    if command -v dpkg >/dev/null; then
      dpkg -x "$f" "$prefix"
    else  # a .deb is an ar archive holding data.tar.*
      member=$(ar t "$f" | grep '^data\.tar')
      case "$member" in *.zst) z=--zstd ;; *.gz) z=-z ;; *) z=-J ;; esac
      ar p "$f" "$member" | tar -x "$z" -C "$prefix"
    fi
  done
  export CMAKE_PREFIX_PATH="${CMAKE_PREFIX_PATH:+$CMAKE_PREFIX_PATH:}$prefix/usr"
  # the SQLite runtime only where the machine has none (the system's own is preferred)
  if ! ldconfig -p | grep -q 'libsqlite3.so.0 '; then
    export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
export PYTHONPATH="$PWD/build/gpu/stage${PYTHONPATH:+:$PYTHONPATH}"
export GPUFLEET_EXPECT_CUDA_BUILD=1 PYTHONUNBUFFERED=1

{
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') steps: ${steps[*]}"
  echo "python: $PY ($("$PY" --version 2>&1)), cmake: $CMAKE, nvcc: $CUDACXX, architectures: $CUDA_ARCHITECTURES"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not found"
  fi
} >"$summary"

do_build() {
  if [ ! -f build/gpu/build.ninja ]; then
    "$CMAKE" -Wno-unused-cli -S . -B build/gpu -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" \
      -DGPUFLEET_CUDA=ON -DGPUFLEET_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES" -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" || return
  fi
  "$CMAKE" --build build/gpu -j "$JOBS"
}
do_ctest() { (cd build/gpu && "$(dirname "$CMAKE")/ctest" -j 8 --output-on-failure); }
export GPU_TESTS="tests/python/test_tensor.py tests/python/test_dlpack.py tests/python/test_kernels.py
  tests/python/test_cuda_contract.py tests/python/test_cuda_lifetimes.py
  tests/python/test_devices.py tests/python/test_cli_info.py tests/python/test_executor.py tests/python/test_launch.py"
# shellcheck disable=SC2086  # GPU_TESTS: paths without spaces, split on purpose
do_pytest() { "$PY" -m pytest -q -rs -p no:cacheprovider $GPU_TESTS; }
do_sanitize() {
  local cs=compute-sanitizer rc=0
  command -v $cs >/dev/null || cs=/usr/local/cuda/bin/compute-sanitizer
  echo "== memcheck: CUDA kernels against the CPU (CuPy inputs)"
  $cs --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
    tests/python/test_kernels.py -k "cuda_matches_cpu and cupy" || rc=$?
  echo "== memcheck: CUDA tensors"
  $cs --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
    tests/python/test_tensor.py tests/python/test_dlpack.py -k "cuda or gpu or pinned" || rc=$?
  # Lifetimes: memcheck also reports CUDA API errors, such as a release on a destroyed stream (the
  # injected cudaFree failure throws before any CUDA call, so it is no API error).
  echo "== memcheck: lifetimes and exports of CUDA memory (issue 17)"
  $cs --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
    tests/python/test_cuda_lifetimes.py -k "not caching_fallback" || rc=$?
  echo "== memcheck: the contract tests on small inputs (the large-batch ones are too slow under memcheck)"
  $cs --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
    tests/python/test_cuda_contract.py -k "nan or infinite or near_ties or random_histograms" || rc=$?
  echo "== racecheck: the shared-memory kernels on 97x211 images"
  $cs --tool racecheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
    tests/python/test_kernels.py -k "cuda_matches_cpu and cupy and shape4" || rc=$?
  for tool in racecheck synccheck; do
    echo "== $tool: k-means' level-by-level divide and conquer (shared ranges, barriers)"
    $cs --tool $tool --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=0 \
      tests/python/test_cuda_contract.py -k "random_histograms" || rc=$?
  done
  return $rc
}
do_bench() {
  echo "== gpufleet info"; "$PY" -m gpufleet info
  echo "== transfer_bench --quick"; "$PY" benchmarks/transfer_bench.py --quick
  echo "== kernels_gpu"; "$PY" benchmarks/kernels_gpu.py
}
export -f do_build do_ctest do_pytest do_sanitize do_bench

run_step() {  # run_step NAME LOG SECONDS FUNCTION
  local t0=$SECONDS rc
  timeout "$3" bash -c "$4" >>"$out/$2" 2>&1
  rc=$?
  echo "$1: exit $rc, $((SECONDS - t0)) s (log: $2)" >>"$summary"
  return $rc
}

status=0
for s in "${steps[@]}"; do
  case "$s" in
    build)    run_step build build.log 420 do_build || { status=1; break; } ;;
    test)     run_step ctest ctest.log 90 do_ctest || status=1
              run_step pytest pytest.log 480 do_pytest || status=1 ;;
    sanitize) run_step sanitize sanitize.log 570 do_sanitize || status=1 ;;
    bench)    run_step bench bench.log 300 do_bench || status=1 ;;
    *) echo "unknown step '$s': expected build, test, sanitize or bench" >&2; exit 2 ;;
  esac
done
cat "$summary"
exit $status
