#!/usr/bin/env bash
# Note [Stubs]: python/gpufleet/_core/*.pyi, the type stubs of the compiled core, are generated from the
# built module by pybind11-stubgen (a package of stubs, as _core has the submodule `pipeline`; next to
# _core.*.so at run time the folder is never imported: an extension module wins over a folder without
# __init__.py). They are committed and shipped in the wheel (py.typed), so editors and mypy see the
# real signatures. `check` regenerates them from a build and fails when the committed ones differ:
# a binding changed without `make stubs`.
#
#   scripts/stubs.sh write|check [STAGE]     STAGE: a staged build (default build/nocuda/stage)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/stubs.sh write|check [STAGE]}
stage=${2:-build/nocuda/stage}
VENV=${VENV:-.venv}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The package loads its parts lazily (Note [Lazy package] in python/gpufleet/__init__.py), and the parts add
# Python methods to _core's classes (Tensor.__array__, ...): every part is loaded before the stubs are made.
PYTHONPATH="$stage" "$VENV/bin/python" -c 'import sys, gpufleet; gpufleet._load()
from pybind11_stubgen import main; main(sys.argv[1:])' gpufleet._core -o "$tmp" --exit-code >"$tmp/log" 2>&1 || {
  cat "$tmp/log" >&2; echo "stubs: pybind11-stubgen failed (a signature it cannot express?)" >&2; exit 1; }
# Two fix-ups of what pybind11-stubgen writes: it takes the class gpufleet._core.dtype, named as NumPy's,
# for numpy.dtype in the `self` of its methods (`self` needs no annotation); and it imports the
# exception DeviceSelectionTimeout (created in C++ as "gpufleet.DeviceSelectionTimeout") from the
# package, which re-exports it from _core: a cycle mypy cannot follow, so the stub declares it.
"$VENV/bin/python" - "$tmp/gpufleet/_core/__init__.pyi" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
fixes = [("(self: numpy.dtype[typing.Any])", "(self)"),
         ("from gpufleet import DeviceSelectionTimeout\n", ""),
         ("class DeviceSelectionError(RuntimeError):\n    pass\n",
          "class DeviceSelectionError(RuntimeError):\n    pass\n"
          "class DeviceSelectionTimeout(DeviceSelectionError, TimeoutError):\n    pass\n")]
for old, new in fixes:
    if old not in text:
        sys.exit(f"stubs: the fix-up for {old!r} no longer applies: look at what pybind11-stubgen writes now")
    text = text.replace(old, new)
open(path, "w").write(text)
PY
case "$mode" in
  write)
    rm -rf python/gpufleet/_core
    cp -r "$tmp/gpufleet/_core" python/gpufleet/_core
    echo "stubs: wrote python/gpufleet/_core/ ($(ls python/gpufleet/_core | tr '\n' ' '))" ;;
  check)
    if ! diff -ru python/gpufleet/_core "$tmp/gpufleet/_core" >"$tmp/diff"; then
      head -60 "$tmp/diff" >&2
      echo "stubs: python/gpufleet/_core/*.pyi are stale against $stage: run 'make stubs' and commit them" >&2
      exit 1
    fi
    echo "stubs: python/gpufleet/_core/*.pyi match the module in $stage" ;;
  *) echo "unknown mode '$mode': expected write or check" >&2; exit 2 ;;
esac
