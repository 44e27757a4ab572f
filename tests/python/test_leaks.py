"""Leak check: file descriptors, threads and child processes (zombies included) of this process stay
the same around repeated runs of the dispatcher, executors, spawn and pipelines (thread and process
maps, a sink). Each case runs once to warm up (imports, lazily created pools), then N more times;
the counts after must equal the counts after the warm-up. Generic on purpose: it only creates, uses
and shuts down through the public API, so rewrites of the parts keep it valid."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

import gpufleet
from gpufleet.sinks import SqlSink

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import exec_funcs as F  # noqa: E402

pytestmark = pytest.mark.timeout(300)

REPEAT = 5


def _singleton(p) -> bool:
    """multiprocessing's resource tracker (and forkserver): one per process, started on first use."""
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing.resource_tracker" in cmd or "multiprocessing.forkserver" in cmd


def _counts() -> dict:
    me = psutil.Process()
    kids = [k for k in me.children() if not _singleton(k)]
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task")),
            "children": len(kids), "zombies": sum(1 for k in kids if _status(k) == psutil.STATUS_ZOMBIE)}


def _status(p):
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return None


def _settled(expected: dict, timeout: float = 10.0) -> dict:
    """The counts once they stop moving towards `expected` (threads and children end asynchronously
    after a shutdown returns)."""
    end = time.monotonic() + timeout
    now = _counts()
    while now != expected and time.monotonic() < end:
        time.sleep(0.05)
        now = _counts()
    return now


def _check(case):
    case(0)
    base = _settled({**_counts(), "children": 0, "zombies": 0})
    assert base["children"] == 0 and base["zombies"] == 0, f"after the warm-up: {base}"
    for i in range(1, REPEAT + 1):
        case(i)
    after = _settled(base)
    assert after == base, f"{REPEAT} more runs changed the counts: {base} -> {after}"


def test_dispatcher_runs(sim_gpus, tmp_path):
    sim_gpus(2)

    def case(i):
        tasks = [gpufleet.Task(["sh", "-c", 'printf x > "$0"; exit $1', "{output}", "1" if k % 3 == 2 else "0"],
                               outputs=[tmp_path / f"{i}-{k}.txt"]) for k in range(6)]
        tasks.append(gpufleet.Task(["sleep", "5"], timeout=0.2))
        tasks.append(gpufleet.Task(["/no/such/program"]))
        gpufleet.run(tasks, journal=tmp_path / "j.sqlite", log_dir=tmp_path / "logs", quiet=True, kill_grace=0.1,
                     quarantine_after=0)
        gpufleet.run([gpufleet.Task(["true"])] * 3, quiet=True, output="null")

    _check(case)


def test_executors(sim_gpus):
    sim_gpus(2)

    def case(i):
        with gpufleet.GPUExecutor(slots_per_device=2) as ex:
            assert list(ex.map(F.square, range(8))) == [x * x for x in range(8)]
            with pytest.raises(Exception):
                ex.submit(F.fail, 3).result()

    _check(case)


def test_spawn(sim_gpus, tmp_path):
    sim_gpus(2)

    def case(i):
        gpufleet.spawn(F.rank_env, args=(str(tmp_path), -1))

    _check(case)


def test_pipelines(tmp_path):
    def case(i):
        sink = SqlSink(str(tmp_path / "p.db"), "rows", key="id", batch_rows=16)
        r = (gpufleet.Pipeline(range(200))
             .map(lambda x: x + 1, workers=3)
             .map(F.square, workers=2, processes=True)
             .map(lambda x: {"id": x, "v": float(x)})
             .sink(sink)
             .run())
        assert r.errors == []

    _check(case)
