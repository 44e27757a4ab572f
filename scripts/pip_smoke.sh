#!/usr/bin/env bash
# Note [Install smoke]: what a new user does, checked in `make test`. From a copy of the tree as a
# clone has it (tracked and untracked-but-not-ignored files: no build/, no .venv), `pip install`
# into a fresh venv with build isolation, so pip itself fetches the build requirements pyproject.toml
# declares (scikit-build-core, pybind11, and CMake and Ninja from PyPI where the machine's are too old:
# Debian 12's CMake 3.25.1 is), then tests/smoke/smoke_installed.py runs against the INSTALLED package
# (import, `gpufleet info`, `gpufleet run` in a pseudo-terminal, GPUExecutor.map, a kernel, the stubs,
# every example with small inputs).
#
#   scripts/pip_smoke.sh auto|off     GPUFLEET_CUDA=AUTO (CUDA when nvcc is there) or OFF
#
# A compiler cache keeps this cheap: CMake takes CMAKE_<LANG>_COMPILER_LAUNCHER from the environment,
# and CCACHE_BASEDIR makes the cache keys independent of where the copy lies, so the objects that
# scripts/build.sh compiled for the same sources are reused (the pybind11 bindings are not: their
# include path is pip's temporary build environment, a new folder each time).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:?usage: scripts/pip_smoke.sh auto|off}
case "$flavour" in
  auto) cuda=AUTO ;;
  off)  cuda=OFF ;;
  *) echo "unknown flavour '$flavour': expected auto or off" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
work="$PWD/${BUILD_ROOT:-build}/pip-smoke-$flavour"
rm -rf "$work"
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work/src"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
if command -v ccache >/dev/null; then
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache CMAKE_CUDA_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR="$work/src" CCACHE_NOHASHDIR=1 CCACHE_STATSLOG="$work/ccache-stats.log"
  # scikit-build-core would take Python's own CC/CXX (sysconfig: gcc, g++); scripts/build.sh lets CMake
  # pick cc/c++. The same compiler names keep the cache keys equal.
  export CC=${CC:-cc} CXX=${CXX:-c++}
fi
echo "== pip install '.[examples]' -Ccmake.define.GPUFLEET_CUDA=$cuda (fresh venv $work/venv)"
start=$(date +%s)
"$work/venv/bin/python" -m pip install -q "$work/src[examples]" "-Ccmake.define.GPUFLEET_CUDA=$cuda" \
  -Cbuild-dir="$work/src/build/{wheel_tag}"
echo "pip install took $(( $(date +%s) - start )) s"
if [ -f "$work/ccache-stats.log" ]; then
  echo "ccache for this install: $(ccache --show-log-stats 2>/dev/null | grep -E '^ *(Hits|Misses):' | tr -s ' ' | tr '\n' ';')"
fi
cd "$work"   # not the source tree: `import gpufleet` must find the installed package
expect_cuda=0
if [ "$cuda" = AUTO ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then expect_cuda=1; fi
GPUFLEET_EXPECT_CUDA_BUILD=$expect_cuda "$work/venv/bin/python" "$work/src/tests/smoke/smoke_installed.py" "$work/src"
