"""Worker processes for the executor, ``spawn`` and ``gpufleet launch``: started fresh (never
forked from a process that may hold a CUDA context) with CUDA_VISIBLE_DEVICES in their environment
before they import anything, each in its own process group, tracked by the same supervisor as the
dispatcher's tasks (Note [No process outlives the dispatcher] in csrc/dispatch/supervisor.cpp)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

from . import _core

_RESERVED = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_RUN_ID", "GPUFLEET_DEVICE", "GPUFLEET_SLOT",
             "GPUFLEET_WORKER")


class Supervised:
    """One supervisor (reaper) for a group of worker processes."""

    def __init__(self, grace: float = 5.0):
        self.token = _core.random_token()
        self.marker = f"GPUFLEET_RUN_ID={self.token}"
        self.grace = grace
        self.sup = _core.Supervisor(self.marker, grace)

    def env(self, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _RESERVED}
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["GPUFLEET_RUN_ID"] = self.token
        env.update(extra)
        return env

    def popen(self, argv: Sequence[str], extra_env: dict, **kw) -> subprocess.Popen:
        p = subprocess.Popen(list(argv), env=self.env(extra_env), process_group=0, **kw)
        self.sup.track(p.pid)
        return p

    def forget(self, p: subprocess.Popen) -> None:
        self.sup.untrack(p.pid)

    def close(self) -> None:
        self.sup.close()


def stop_group(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """The kill sequence for every process group: SIGTERM, up to `grace` seconds, SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in live):
        time.sleep(0.01)
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)  # also whatever the leader left in its group
    for p in live:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_worker(sup: Supervised, extra_env: dict, pass_fds: Sequence[int] = ()) -> tuple[subprocess.Popen, socket.socket]:
    """A fresh Python worker (gpufleet._executor_worker) and the parent's end of its socket.
    ``pass_fds``: descriptors the worker inherits at the same numbers (those of multiprocessing
    queues in a payload pickled for a child, _serialize.dumps_for_child)."""
    from ._ipc import socketpair

    mine, theirs = socketpair()
    try:
        p = sup.popen([sys.executable, "-c", "from gpufleet._executor_worker import main; main()", str(theirs.fileno())],
                      extra_env, pass_fds=(theirs.fileno(), *pass_fds), stdin=subprocess.DEVNULL)
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return p, mine


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"
