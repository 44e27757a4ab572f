"""Smoke run of an INSTALLED gpufleet (Note [Install smoke] in scripts/pip_smoke.sh).

    <venv>/bin/python tests/smoke/smoke_installed.py SOURCE_TREE

Run by the venv's Python from outside the source tree; every check prints one line and the first
failure stops it with a non-zero status. SOURCE_TREE is where the examples are.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import termios
import time

import numpy as np

SRC = os.path.abspath(sys.argv[1])
BIN = os.path.dirname(sys.executable)
EXPECT_CUDA = os.environ.get("GPUFLEET_EXPECT_CUDA_BUILD")


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
    if not ok:
        sys.exit(1)


def in_pty(argv: list, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Runs argv with a pseudo-terminal as stdin/stdout/stderr; returns (status, everything it wrote)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of 100 columns (a new pty has 0, and tqdm then draws nothing)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        os.execve(argv[0], argv, env)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def main() -> None:
    # Executor workers re-import this file as __main__ (spawn): only main() does the work.
    # ---- import: the installed package, its compiled core, its stubs -----------------------------------
    import gpufleet

    site = sysconfig.get_paths()["purelib"]
    check("import gpufleet from the venv's site-packages", gpufleet.__file__.startswith(site), gpufleet.__file__)
    pkg = os.path.dirname(gpufleet.__file__)
    check("the compiled core, its stubs and py.typed are installed",
          all(os.path.exists(os.path.join(pkg, f)) for f in ("_core/__init__.pyi", "_core/pipeline.pyi", "py.typed"))
          and gpufleet._core.__file__.startswith(pkg), str(os.listdir(pkg)))
    b = gpufleet.build_info()
    if EXPECT_CUDA is not None:
        check(f"CUDA compiled in is {bool(int(EXPECT_CUDA))}", b["cuda"] == bool(int(EXPECT_CUDA)), str(b))
    check("tqdm and cloudpickle came with it (core dependencies)",
          subprocess.run([sys.executable, "-c", "import tqdm, cloudpickle"]).returncode == 0)

    # ---- the command line ------------------------------------------------------------------------------
    env = {**os.environ, "GPUFLEET_SIMULATED_GPUS": "2"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([os.path.join(BIN, "gpufleet"), "info"], capture_output=True, text=True, env=env)
    check("gpufleet info", r.returncode == 0 and r.stdout.startswith(f"gpufleet {gpufleet.__version__}")
          and "SIMULATED" in r.stdout, r.stdout + r.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        code, out = in_pty([os.path.join(BIN, "gpufleet"), "run", "--timeline", os.path.join(tmp, "t.png"), "--",
                            "sh", "-c", "sleep 0.2; echo hi $0", "{}", ":::", "a", "b", "c", "d"], env)
        check("gpufleet run in a terminal: exit 0", code == 0, out)
        check("... with the progress bar drawn (tqdm in a terminal)",
              "\r" in out and re.search(r"\b4(/4)? ?task", out) is not None and "task/s" in out, out)
        check("... every task's output and the summary", all(f"hi {x}" in out for x in "abcd")
              and "4 tasks" in out and "4 succeeded" in out, out)
        check("... the timeline written (plot extra, via [examples])",
              open(os.path.join(tmp, "t.png"), "rb").read(4) == b"\x89PNG")

    # ---- Python callables across (simulated) GPUs ---------------------------------------------------------
    import operator

    with gpufleet.simulate_gpus(2):
        with gpufleet.GPUExecutor(slots_per_device=1) as ex:
            got = list(ex.map(operator.neg, range(20)))
    check("GPUExecutor.map over 2 simulated GPUs", got == [-i for i in range(20)], str(got))

    # ---- a kernel against NumPy ----------------------------------------------------------------------------
    from gpufleet import kernels as K

    img = np.random.default_rng(0).integers(0, 256, (37, 53)).astype(np.uint8)
    got = K.mean(img)
    check("kernels.mean equals NumPy's", abs(got - img.mean()) < 1e-9, f"{got} vs {img.mean()}")
    r = K.kmeans1d(img, 3)
    check("kernels.kmeans1d: 3 sorted centres", len(r.centres) == 3 and list(r.centres) == sorted(r.centres), str(r))

    # ---- every example, small -------------------------------------------------------------------------------
    EXAMPLES = {
        "device_basics.py": [],
        "depth_congestion.py": ["--batch", "2", "--height", "64", "--width", "96"],
        "depth_pipeline.py": ["--ids", "3", "--size", "37x53", "--workers", "2", "--workdir", "{tmp}", "--plot",
                              "{tmp}/p.png"],
        "video_pipeline.py": ["--frames", "24", "--size", "72x96", "--batch-sizes", "1,4", "--out", "{tmp}",
                              "--device-ms", "1"],
        "multi_swap.py": ["{tmp}", "--videos", "2", "--images", "2", "--seconds", "0.2"],
        "executor_inference.py": ["--items", "64"],
        "spawn_training.py": ["--steps", "5"],
        "demo.py": ["{tmp}"],
    }
    listed = sorted(f for f in os.listdir(os.path.join(SRC, "examples")) if f.endswith(".py") and not f.startswith("_")
                    and f != "face_swap_standin.py")  # run by multi_swap.py
    check("every example is in the smoke list", listed == sorted(EXAMPLES), f"{listed} vs {sorted(EXAMPLES)}")
    for name, args in EXAMPLES.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = time.monotonic()
            r = subprocess.run([sys.executable, os.path.join(SRC, "examples", name), *[a.format(tmp=tmp) for a in args]],
                               capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
            check(f"examples/{name} {' '.join(args)} ({time.monotonic() - t:.1f} s)", r.returncode == 0,
                  r.stdout[-3000:] + r.stderr[-3000:])
    print("smoke run of the installed package: all checks passed")


if __name__ == "__main__":
    main()
