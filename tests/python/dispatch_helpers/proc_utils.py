"""Process checks shared by the dispatcher and executor tests: which of some pids still run, waiting
for a condition, the environment of a child Python that imports the staged gpufleet."""
from __future__ import annotations

import os
import time

import psutil


def alive(pids):
    """The pids that still run (zombies count as gone: they hold nothing but a table entry)."""
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids, timeout=10.0):
    """Waits up to `timeout` seconds for every pid to end; returns those still running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive(pids):
        time.sleep(0.02)
    return alive(pids)


def wait_for(pred, timeout=20.0) -> bool:
    """Polls `pred` every 20 ms for up to `timeout` seconds; whether it became true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def stage_env(**extra) -> dict:
    """This process's environment for a child Python that imports the same gpufleet (the staged
    build), with no simulated GPUs unless `extra` sets them."""
    import gpufleet

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(gpufleet.__file__)),
                                         env.get("PYTHONPATH", "")])
    env.pop("GPUFLEET_SIMULATED_GPUS", None)
    env.update(extra)
    return env
