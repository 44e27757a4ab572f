"""Process checks shared by the dispatcher and executor tests: which of some pids still run."""
from __future__ import annotations

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
