"""GPUExecutor and spawn with real processes on simulated GPUs."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import psutil
import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import exec_funcs as F  # noqa: E402
from proc_utils import alive as _alive, wait_gone as _wait_gone  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_each_worker_has_its_gpu_and_initializer_runs_once(sim_gpus, tmp_path):
    sim_gpus(3)
    inits = tmp_path / "inits"
    n = random.randint(17, 31)
    with gpufleet.GPUExecutor(slots_per_device=2, initializer=F.init, initargs=(str(inits),)) as ex:
        workers = ex.workers
        res = list(ex.map(F.where, range(n)))
    assert [r["x"] for r in res] == list(range(n))
    assert len(workers) == 6
    for r in res:
        assert r["cvd"] == r["device"].split(":")[1] and r["order"] == "PCI_BUS_ID"
        assert r["model_pid"] == r["pid"]  # the initializer ran in this very worker
    init_pids = inits.read_text().split()
    assert len(init_pids) == 6 and len(set(init_pids)) == 6
    assert _wait_gone([p for _, p in workers]) == []


def test_arrays_and_results_round_trip(sim_gpus):
    sim_gpus(1)
    a = np.random.default_rng().standard_normal((513, 7))
    with gpufleet.GPUExecutor() as ex:
        out = ex.submit(F.square, a).result()
    np.testing.assert_array_equal(out, a * a)


def test_exception_comes_back_with_remote_traceback_and_device(sim_gpus):
    sim_gpus(2)
    with gpufleet.GPUExecutor() as ex:
        fut = ex.submit(F.fail, "item-7")
        with pytest.raises(ValueError, match="cannot handle 'item-7'") as info:
            fut.result()
        assert ex.submit(F.square, 3).result() == 9  # the worker survives an exception
    e = info.value
    assert isinstance(e.__cause__, gpufleet.RemoteTraceback) and "exec_funcs.py" in e.__cause__.tb
    assert any("on cuda:" in n for n in e.__notes__)


@pytest.mark.parametrize("fn,arg,what", [(F.die_by_signal, 0, "killed by SIGKILL"), (F.hard_exit, 7, "exit code 7")])
def test_worker_death_fails_its_future_and_is_replaced(sim_gpus, fn, arg, what):
    sim_gpus(1)
    with gpufleet.GPUExecutor() as ex:
        (_, before), = ex.workers
        with pytest.raises(gpufleet.WorkerDiedError, match=what) as info:
            ex.submit(fn, arg).result()
        assert info.value.device == "cuda:0"
        assert ex.submit(F.square, 5).result() == 25
        (_, after), = ex.workers
        assert after != before


def test_max_tasks_per_worker_recycles(sim_gpus):
    sim_gpus(1)
    with gpufleet.GPUExecutor(max_tasks_per_worker=3) as ex:
        pids = [ex.submit(F.where, i).result()["pid"] for i in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]


def test_shutdown_cancel_futures(sim_gpus, tmp_path):
    sim_gpus(1)
    rec = tmp_path / "ran"
    ex = gpufleet.GPUExecutor()
    futs = [ex.submit(F.sleep_and_record, str(rec), 0.3) for _ in range(6)]
    time.sleep(0.2)
    pids = [p for _, p in ex.workers]
    ex.shutdown(wait=True, cancel_futures=True)
    assert futs[0].result() == 0.3
    assert sum(f.cancelled() for f in futs) >= 4
    with pytest.raises(CancelledError):
        futs[-1].result()
    assert len(rec.read_text().split()) <= 2
    assert _wait_gone(pids) == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(F.square, 1)


def test_no_gpu_is_a_clear_error_and_cpu_workers_work(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="no GPU visible"):
        gpufleet.GPUExecutor()
    with gpufleet.GPUExecutor(devices="cpu", workers=2) as ex:
        assert sorted(ex.map(F.square, [1, 2, 3])) == [1, 4, 9]
        assert {ex.submit(F.where, 0).result()["cvd"] for _ in range(2)} == {""}


CTRL_C_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import gpufleet, exec_funcs as F
gpufleet.simulate_gpus(2)
with gpufleet.GPUExecutor() as ex:
    print("PIDS", *[p for _, p in ex.workers], flush=True)
    futs = [ex.submit(F.sleep_and_record, sys.argv[2], 30) for _ in range(4)]
    futs[0].result()
"""


def test_ctrl_c_leaves_no_worker(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(gpufleet.__file__))
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(Path(__file__).parent / "dispatch_helpers"),
                          str(tmp_path / "ran")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()[1:]]
    assert len(pids) == 2
    end = time.monotonic() + 20
    while time.monotonic() < end and not ((tmp_path / "ran").exists() and len((tmp_path / "ran").read_text().split()) == 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert _wait_gone(pids) == []


# ---- spawn ----------------------------------------------------------------------------------------

def test_spawn_sets_the_environment_of_every_rank(sim_gpus, tmp_path):
    sim_gpus(3)
    gpufleet.spawn(F.rank_env, args=(str(tmp_path), -1))
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    ports = {r["MASTER_PORT"] for r in recs}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for r, rec in enumerate(recs):
        assert rec["RANK"] == rec["LOCAL_RANK"] == str(r)
        assert rec["WORLD_SIZE"] == rec["LOCAL_WORLD_SIZE"] == "3"
        assert rec["MASTER_ADDR"] == "127.0.0.1" and rec["CUDA_VISIBLE_DEVICES"] == str(r)


def test_spawn_first_failure_stops_the_others(sim_gpus, tmp_path):
    sim_gpus(3)
    t0 = time.monotonic()
    with pytest.raises(gpufleet.ProcessRaisedException, match="rank 1 diverged") as info:
        gpufleet.spawn(F.rank_env, args=(str(tmp_path), 1), kill_grace=1.0)
    assert time.monotonic() - t0 < 20
    assert info.value.rank == 1 and "exec_funcs.py" in str(info.value)
    pids = [json.loads((tmp_path / f"rank{r}.json").read_text())["pid"] for r in range(3)]
    assert _wait_gone(pids) == []


def test_spawn_signal_death_and_join_false(sim_gpus, tmp_path):
    sim_gpus(2)
    ctx = gpufleet.spawn(F.rank_env, args=(str(tmp_path), -2), join=False)
    assert len(ctx.pids()) == 2
    with pytest.raises(gpufleet.ProcessExitedException, match="SIGSEGV") as info:
        while not ctx.join(timeout=5):
            pass
    assert info.value.rank == 0 and info.value.signal_name == "SIGSEGV"
    with pytest.raises(ValueError, match="nprocs=5 but 2 devices"):
        gpufleet.spawn(F.rank_env, args=(str(tmp_path), -1), nprocs=5)


def test_two_spawns_at_once_get_different_ports(sim_gpus, tmp_path):
    sim_gpus(2)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    threads = [threading.Thread(target=gpufleet.spawn, args=(F.rank_env,), kwargs={"args": (str(d), -1)}) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = [json.loads((d / "rank0.json").read_text())["MASTER_PORT"] for d in dirs]
    assert ports[0] != ports[1]


def test_map_with_chunks_keeps_order(sim_gpus):
    sim_gpus(2)
    n = random.randint(50, 97)
    with gpufleet.GPUExecutor() as ex:
        assert list(ex.map(F.square, range(n), chunksize=7)) == [i * i for i in range(n)]
        with pytest.raises(ValueError, match="chunksize must be an int >= 1"):
            ex.map(F.square, [1], chunksize=0)


def test_report_and_progress(sim_gpus, tmp_path):
    sim_gpus(2)
    with gpufleet.GPUExecutor(slots_per_device=2, progress=True) as ex:
        list(ex.map(F.square, range(11)))
        with pytest.raises(ValueError):
            ex.submit(F.fail, 1).result()
        rep = ex.report()
    assert rep.total == 12 and rep.succeeded == 11 and rep.failed == 1
    assert sum(d["tasks"] for d in rep.devices.values()) == 12
    assert Path(rep.plot_timeline(tmp_path / "x.png")).read_bytes()[:4] == b"\x89PNG"
    assert "12 tasks" in rep.summary()
    with gpufleet.GPUExecutor() as ex:
        with pytest.raises(RuntimeError, match="keeps no report"):
            ex.report()
