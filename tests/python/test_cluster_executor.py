"""``GPUExecutor(cluster=...)`` on a real three-node Ray cluster on loopback (cluster_helpers.py): one
Ray actor per GPU slot, the initializer once per actor, concurrent.futures semantics, remote
tracebacks naming node and device, a worker killed mid-call, large arrays through the object store."""
from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import cluster_funcs as funcs  # noqa: E402
from cluster_helpers import MARKS, NODES, cluster, total_gpus  # noqa: E402,F401 - cluster: the fixture
from proc_utils import wait_for  # noqa: E402

pytestmark = MARKS


# these make their own executors: before the module's pool takes every GPU

def test_an_initializer_that_raises_breaks_the_executor(cluster):
    ex = gpufleet.GPUExecutor(cluster=cluster.address, initializer=funcs.bad_init)
    fut = ex.submit(funcs.where, 1)
    err = fut.exception(timeout=60)
    assert isinstance(err, gpufleet.BrokenGPUExecutor) and "no model here" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    with pytest.raises(gpufleet.BrokenGPUExecutor):
        ex.submit(funcs.where, 2)
    ex.shutdown()


def test_shutdown_cancels_queued_calls_and_frees_the_gpus(cluster):
    import ray

    ex = gpufleet.GPUExecutor(cluster=cluster.address, slots_per_device=2)
    futs = [ex.submit(time.sleep, 0.5) for _ in range(60)]
    time.sleep(1.0)
    ex.shutdown(wait=True, cancel_futures=True)
    done = [f for f in futs if not f.cancelled()]
    assert all(f.result() is None for f in done) and 0 < len(done) < 60
    assert wait_for(lambda: ray.available_resources().get("GPU", 0) >= total_gpus(), 30)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(funcs.where, 1)


@pytest.fixture(scope="module")
def pool(cluster, tmp_path_factory):
    """One executor for the module: 7 GPUs, one worker each, each initialised once."""
    logs = tmp_path_factory.mktemp("init")
    ex = gpufleet.GPUExecutor(cluster=cluster.address, initializer=funcs.init, initargs=(str(logs),), report=True)
    yield ex, logs
    ex.shutdown()


def test_map_runs_in_order_on_every_gpu_of_every_node_after_one_initializer_each(pool):
    ex, logs = pool
    out = list(ex.map(funcs.where, range(200)))
    assert [o[0] for o in out] == [x * x for x in range(200)]
    devices = {o[1] for o in out}
    assert devices == {f"{n}/cuda:{i}" for n, (g, _) in NODES.items() for i in range(g)}  # every GPU took work
    for _, device, node, cvd, _, initialized in out:
        assert device == f"{node}/cuda:{cvd}"  # its own node's GPU, as Ray gave it
        assert initialized == 1
    pids = {o[4] for o in out}
    assert len(pids) == total_gpus() == len(ex.workers)
    assert sorted(p.name for p in logs.iterdir()) == sorted(f"init-{p}" for p in pids)
    assert all((logs / f"init-{p}").read_text() == "init\n" for p in pids)  # once per actor


def test_submit_errors_carry_the_remote_traceback_node_and_device(pool):
    ex, _ = pool
    fut = ex.submit(funcs.boom, 7)
    err = fut.exception(timeout=60)
    assert isinstance(err, ValueError) and str(err) == "boom 7"
    assert "raise ValueError(f\"boom {x}\")" in str(err.__cause__) and "cluster_funcs.py" in str(err.__cause__)
    note = err.__notes__[0]
    assert note.startswith("raised in gpufleet worker") and any(f" on {n}/cuda:" in note for n in NODES)
    assert "CUDA_VISIBLE_DEVICES=" in note
    # lambdas and closures travel by value, as locally
    k = 3
    assert ex.submit(lambda x: x + k, 4).result(timeout=60) == 7


def test_large_arrays_travel_through_the_object_store_and_come_back_writable(pool):
    ex, _ = pool
    a = np.random.default_rng(5).standard_normal((1023, 1031))  # ~8 MB, odd shape
    b = ex.submit(funcs.double, a).result(timeout=60)
    np.testing.assert_array_equal(b, a * 2)
    b[0, 0] = 1.0  # writable, as a local executor's result
    chunks = list(ex.map(funcs.double, [a[i::3] for i in range(3)], chunksize=2))
    assert [c.shape for c in chunks] == [a[i::3].shape for i in range(3)]


def test_the_report_groups_calls_by_node(pool):
    ex, _ = pool
    r = ex.report()
    assert r.nodes == sorted(NODES)
    assert set(r.devices) == {f"{n}/cuda:{i}" for n, (g, _) in NODES.items() for i in range(g)}
    assert {t.node for t in r.tasks} == set(NODES)


def test_a_worker_killed_mid_call_fails_that_call_and_is_replaced(pool, tmp_path):
    ex, _ = pool
    marker = tmp_path / "pid"
    fut = ex.submit(funcs.slow, str(marker), 60)
    assert wait_for(lambda: marker.exists() and marker.read_text(), 60)
    victim = int(marker.read_text())
    others = [ex.submit(funcs.where, i) for i in range(20)]
    os.kill(victim, signal.SIGKILL)
    err = fut.exception(timeout=60)
    assert isinstance(err, gpufleet.WorkerDiedError), err
    assert "died" in str(err) and "it was replaced" in str(err) and err.device.split("/")[0] in NODES
    wait(others, timeout=60)
    assert [f.result()[0] for f in others] == [i * i for i in range(20)]  # nothing else was lost
    assert wait_for(lambda: len(ex.workers) == total_gpus() and victim not in [p for _, p in ex.workers], 60)
    again = list(ex.map(funcs.where, range(40)))
    assert victim not in {o[4] for o in again}
    assert {o[5] for o in again} == {1}  # the replacement ran the initializer too
