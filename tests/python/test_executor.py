"""GPUExecutor and spawn with real processes on simulated GPUs."""
from __future__ import annotations

import functools
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


# ---- the concurrent.futures contract (REFERENCE.md; CPython's own tests: test_cpython_futures.py) ------

@pytest.mark.parametrize("kw,value", [("workers", 0), ("workers", -1), ("max_workers", 0), ("max_workers", -3)])
def test_worker_counts_below_one_are_refused_as_process_pool_does(kw, value):
    from concurrent.futures import ProcessPoolExecutor

    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ProcessPoolExecutor(max_workers=value)  # the reference
    with pytest.raises(ValueError, match=f"{kw} must be greater than 0, got {value}"):
        gpufleet.GPUExecutor(devices="cpu", **{kw: value})


def test_a_worker_that_died_idle_is_replaced_and_the_next_call_runs(sim_gpus):
    sim_gpus(1)
    with gpufleet.GPUExecutor() as ex:
        assert ex.submit(F.square, 2).result() == 4
        (_, pid), = ex.workers
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone([pid]) == []
        # until its last thread has exited its socket still takes calls: wait until it is noticed
        end = time.monotonic() + 20
        while pid in [p for _, p in ex.workers] and time.monotonic() < end:
            time.sleep(0.01)
        assert [ex.submit(F.square, i).result() for i in range(3)] == [0, 1, 4]  # no BrokenPipeError
        (_, new), = ex.workers
        assert new != pid


def test_a_failing_initializer_breaks_the_executor_as_process_pool_does(tmp_path):
    from concurrent.futures import BrokenExecutor
    from concurrent.futures.process import BrokenProcessPool

    runs = tmp_path / "runs"
    ex = gpufleet.GPUExecutor(devices="cpu", workers=2, initializer=F.init_fail, initargs=(str(runs),))
    futs = [ex.submit(F.square, i) for i in range(7)]
    for f in futs:
        with pytest.raises(gpufleet.BrokenGPUExecutor, match="initializer of gpufleet worker .* raised ValueError"):
            f.result(timeout=60)
    e = futs[0].exception()
    assert isinstance(e, BrokenProcessPool) and isinstance(e, BrokenExecutor)
    assert isinstance(e.__cause__, ValueError) and "model file missing" in str(e.__cause__)
    assert "init_fail" in e.__cause__.__cause__.tb  # the initializer's own traceback
    end = time.monotonic() + 10
    while not ex._broken and time.monotonic() < end:
        time.sleep(0.01)
    with pytest.raises(gpufleet.BrokenGPUExecutor, match="is broken"):
        ex.submit(F.square, 1)
    ex.shutdown()
    assert 1 <= len(runs.read_text().split()) <= 2  # once per worker, never re-run per call


EXIT_SCRIPT = r"""
import os, sys, gpufleet
ex = gpufleet.GPUExecutor(devices="cpu", workers=2)
futs = [ex.submit(os.system, f"sleep 0.3; echo apple {i}") for i in range(5)]
if sys.argv[1] == "nowait":
    ex.shutdown(wait=False)
"""


@pytest.mark.parametrize("how", ["exit", "nowait"])
def test_interpreter_exit_completes_submitted_calls(how):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(gpufleet.__file__))
    p = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, how], env=env, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.split("\n")[:-1]) == [f"apple {i}" for i in range(5)], (p.stdout, p.stderr)


def test_dropped_executor_finishes_its_calls_and_leaves_nothing():
    import gc

    ex = gpufleet.GPUExecutor(devices="cpu", workers=2)
    res = ex.map(abs, range(-5, 5))
    pids, thread = [p for _, p in ex.workers], ex._engine.thread
    del ex
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert _wait_gone(pids) == []
    assert list(res) == [abs(v) for v in range(-5, 5)]


def test_shutdown_without_wait_finishes_its_calls():
    ex = gpufleet.GPUExecutor(devices="cpu", workers=2)
    res = ex.map(abs, range(-5, 5))
    pids, thread = [p for _, p in ex.workers], ex._engine.thread
    ex.shutdown(wait=False)
    assert list(res) == [abs(v) for v in range(-5, 5)]
    thread.join(timeout=60)
    assert not thread.is_alive() and _wait_gone(pids) == []


def test_no_call_is_kept_alive_and_arguments_are_freed_after_their_call(sim_gpus, tmp_path):
    import gc
    import weakref

    sim_gpus(1)
    with gpufleet.GPUExecutor() as ex:
        arg = F.Token()
        fn = functools.partial(F.ident)
        refs = [weakref.ref(arg), weakref.ref(fn)]
        back = ex.submit(fn, arg).result()
        refs.append(weakref.ref(back))
        del arg, fn, back
        gc.collect()
        assert [r() for r in refs] == [None, None, None]  # the executor holds neither call nor result
        # in the worker: the argument is freed when its call returns, not when the next call arrives
        freed = tmp_path / "freed"
        assert ex.submit(F.token_path, F.Token(str(freed))).result() == str(freed)
        assert freed.read_text() == "freed\n"


def test_pickling_trouble_in_the_worker_fails_the_call_only(sim_gpus):
    from concurrent.futures.process import BrokenProcessPool

    sim_gpus(1)
    with gpufleet.GPUExecutor() as ex:
        (_, pid), = ex.workers
        with pytest.raises(SystemExit):  # raised by __reduce__ while pickling the result
            ex.submit(F.make, "ExitAtPickle").result()
        with pytest.raises(BrokenProcessPool, match="could not be unpickled here") as info:
            ex.submit(F.make, "ErrorAtUnpickle").result()  # raised here, in the parent
        assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(SystemExit):
            ex.submit(F._exit_now, 4).result()
        assert ex.submit(F.square, 9).result() == 81
        assert ex.workers == [("cuda:0", pid)]  # the same worker all along


def test_a_worker_that_exits_while_its_forked_child_lives_fails_the_call_at_once(sim_gpus, tmp_path):
    sim_gpus(1)
    child = tmp_path / "child"
    with gpufleet.GPUExecutor(kill_grace=1.0) as ex:
        t0 = time.monotonic()
        with pytest.raises(gpufleet.WorkerDiedError, match="exit code 3"):
            ex.submit(F.fork_then_exit, str(child)).result(timeout=30)
        assert time.monotonic() - t0 < 20  # not when the child (60 s) exits
        assert _wait_gone([int(child.read_text())]) == []  # the worker's process group went with it
        assert ex.submit(F.square, 3).result() == 9


def test_two_executors_do_not_disturb_each_other_and_nothing_goes_to_dev_shm():
    before = set(os.listdir("/dev/shm"))
    rng = np.random.default_rng()
    arrays = [rng.standard_normal(int(rng.integers(300_000, 900_000))) for _ in range(6)]
    a = gpufleet.GPUExecutor(devices="cpu", workers=1)
    with gpufleet.GPUExecutor(devices="cpu", workers=1) as b:
        fa = [a.submit(np.multiply, x, 2.0) for x in arrays]
        fb = [b.submit(np.multiply, x, 3.0) for x in arrays]
        a.shutdown(wait=True)  # while b's calls are in flight
        fb += [b.submit(np.multiply, x, 3.0) for x in arrays]
        for f, x in zip(fa, arrays):
            np.testing.assert_array_equal(f.result(), x * 2)
        for f, x in zip(fb, arrays + arrays):
            np.testing.assert_array_equal(f.result(), x * 3)
    assert set(os.listdir("/dev/shm")) - before == set()


def test_calls_survive_workers_killed_at_random_moments(sim_gpus):
    """Workers SIGKILLed while arguments are being sent, results read, calls queued: every call
    ends with its result or a WorkerDiedError (never a bare OSError), and calls that never started
    run on the replacement."""
    sim_gpus(2)
    rng = np.random.default_rng()
    arrays = [rng.standard_normal(int(rng.integers(40_000, 400_000))) for _ in range(60)]
    kills = 0
    with gpufleet.GPUExecutor(slots_per_device=2) as ex:
        futs = [ex.submit(np.multiply, x, 2.0) for x in arrays]
        for _ in range(4):
            time.sleep(float(rng.uniform(0.0, 0.05)))
            # ready workers only: two deaths in a row before a worker is ready break the executor
            # (test_a_worker_that_cannot_start_breaks_the_executor)
            live = [p.pid for s, p in ex._engine.processes() if s.state == "ready"]
            if live:
                os.kill(int(rng.choice(live)), signal.SIGKILL)
                kills += 1
        died = 0
        for f, x in zip(futs, arrays):
            try:
                np.testing.assert_array_equal(f.result(timeout=60), x * 2)
            except gpufleet.WorkerDiedError:
                died += 1
        assert died <= kills
        assert ex.submit(F.square, 4).result() == 16


def test_the_next_call_waits_in_the_worker_while_one_runs(sim_gpus):
    """Note [Calls in flight]: a worker never waits on the parent between two calls."""
    sim_gpus(1)
    with gpufleet.GPUExecutor() as ex:
        ex.submit(F.square, 1).result()
        assert [f.result() for f in [ex.submit(F.next_call_waiting, 0.3) for _ in range(4)]] == [True] * 3 + [False]
    r = (gpufleet.Pipeline(range(5), ordered=True)
         .map(lambda x: F.next_call_waiting(0.3), workers=1, processes=True).run())
    assert r.results[:3] == [True] * 3


SIGKILL_SCRIPT = r"""
import sys, time, numpy as np, gpufleet
ex = gpufleet.GPUExecutor(devices="cpu", workers=2)
a = np.ones(8_000_000)
assert ex.submit(np.multiply, a, 2.0).result()[0] == 2.0
big = [ex.submit(np.multiply, a, 3.0) for _ in range(4)]
print("PIDS", *[p for _, p in ex.workers], flush=True)
time.sleep(60)
"""


def test_sigkill_of_the_parent_leaves_no_shared_memory_and_no_worker():
    before = set(os.listdir("/dev/shm"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(gpufleet.__file__))
    p = subprocess.Popen([sys.executable, "-c", SIGKILL_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    with p.stdout:
        line = p.stdout.readline()
    assert line.startswith("PIDS"), line
    pids = [int(x) for x in line.split()[1:]]
    marks = [f"memfd:gpufleet-{x} " for x in [p.pid] + pids]  # the arenas' segments (Note [Shared-memory arenas])
    assert any(m in _maps(pid) for pid in [p.pid] + pids for m in marks)
    p.kill()
    p.wait()
    assert _wait_gone(pids, timeout=30) == []  # the supervisor stopped them
    holders = [pid for pid in psutil.pids() if any(m in _maps(pid) for m in marks)]
    assert holders == []  # nobody maps the arenas any more: the kernel has freed them
    assert set(os.listdir("/dev/shm")) - before == set()


def _maps(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def test_a_worker_that_cannot_start_breaks_the_executor(sim_gpus):
    """Two deaths in a row before a worker is ready are not bad luck (ProcessPoolExecutor breaks at
    the first): here the initializer crashes the interpreter (os._exit, as a native crash would)."""
    sim_gpus(1)
    with gpufleet.GPUExecutor(initializer=F.hard_exit, initargs=(1,)) as ex:
        fut = ex.submit(F.square, 2)
        with pytest.raises(gpufleet.BrokenGPUExecutor,
                           match=r"exited \(exit code 1\) before it was ready, 2 times in a row \(in its initializer\)"):
            fut.result(timeout=60)
        with pytest.raises(gpufleet.BrokenGPUExecutor):
            ex.submit(F.square, 3)
