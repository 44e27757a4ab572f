"""gpufleet.spawn against torch.multiprocessing.spawn's contract, in our own words: the behaviours of
PyTorch's test/test_multiprocessing_spawn.py (return, an exception with its traceback, exit codes
0 and n, death by a signal, ``join=False``, a multiprocessing queue in ``args``) plus the
exceptions' attributes and pickling (torch/multiprocessing/spawn.py). Real processes, real signals."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import exec_funcs as F  # noqa: E402
from proc_utils import wait_gone  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_success_returns_and_join_false_joins_again():
    assert gpufleet.spawn(F.rank_exit, args=(0,), devices="cpu", nprocs=2) is None  # sys.exit(0): success
    ctx = gpufleet.spawn(F.rank_ok_then_raise, devices="cpu", nprocs=1, join=False)
    assert len(ctx.pids()) == 1 and ctx.processes[0].pid == ctx.pids()[0]
    assert ctx.join(timeout=None) is True
    assert ctx.join() is True  # joined already


def test_join_with_a_timeout_returns_false_while_ranks_run():
    ctx = gpufleet.spawn(F.rank_forever, devices="cpu", nprocs=2, join=False)
    t0 = time.monotonic()
    assert ctx.join(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 10
    for pid in ctx.pids():
        import os

        os.kill(pid, signal.SIGTERM)
    with pytest.raises(gpufleet.ProcessExitedException, match="terminated with signal SIGTERM"):
        while not ctx.join(timeout=5):
            pass
    assert wait_gone(ctx.pids()) == []


def test_a_spawn_context_queue_in_args_reaches_every_rank():
    queue = mp.get_context("spawn").SimpleQueue()
    gpufleet.spawn(F.rank_put, args=(queue,), devices="cpu", nprocs=2)
    assert sorted([queue.get(), queue.get()]) == [0, 1]
    q2 = mp.get_context("spawn").Queue()
    gpufleet.spawn(F.rank_put, args=(q2,), devices="cpu", nprocs=3)
    assert sorted(q2.get(timeout=10) for _ in range(3)) == [0, 1, 2]


def test_a_fork_context_queue_is_a_clear_error_before_any_rank_starts():
    with pytest.raises(gpufleet.SerializationError, match=r"fork context.*get_context\('spawn'\)"):
        gpufleet.spawn(F.rank_put, args=(mp.get_context("fork").Queue(),), devices="cpu", nprocs=2)


@pytest.mark.parametrize("failing", [0, 1])
def test_an_exception_comes_back_with_the_rank_its_pid_and_its_traceback(failing):
    with pytest.raises(gpufleet.ProcessRaisedException,
                       match=f"\nValueError: legitimate exception from process {failing}$") as info:
        gpufleet.spawn(F.rank_raise, args=(failing,), devices="cpu", nprocs=2, kill_grace=1.0)
    e = info.value
    assert e.error_index == e.rank == failing and e.pid == e.error_pid > 0
    assert e.msg == str(e) and e.msg.startswith(f"\n\n-- Process {failing} (cpu, pid {e.pid}) terminated with the "
                                                "following error:\n")
    assert "exec_funcs.py" in e.msg and "Traceback" in e.msg and e.device == "cpu"


def test_every_rank_raising_reports_one_of_them():
    with pytest.raises(gpufleet.ProcessRaisedException, match="\nValueError: legitimate exception from process (0|1)$"):
        gpufleet.spawn(F.rank_raise, args=(None,), devices="cpu", nprocs=2)


def test_success_first_then_an_exception():
    with pytest.raises(gpufleet.ProcessRaisedException, match="ValueError: legitimate exception"):
        gpufleet.spawn(F.rank_ok_then_raise, devices="cpu", nprocs=2)


def test_death_by_a_signal_names_the_signal():
    with pytest.raises(gpufleet.ProcessExitedException, match=r"^process 0 terminated with signal SIGABRT \(cpu, pid") as info:
        gpufleet.spawn(F.rank_signal, args=(signal.SIGABRT,), devices="cpu", nprocs=2, kill_grace=1.0)
    e = info.value
    assert e.exit_code == -signal.SIGABRT and e.signal_name == "SIGABRT" and e.error_index == 0


@pytest.mark.parametrize("code", [1, 3, 123])
def test_a_non_zero_exit_code_is_process_exited(code):
    with pytest.raises(gpufleet.ProcessExitedException,
                       match=rf"^process 0 terminated with exit code {code} \(cpu, pid \d+\)$") as info:
        gpufleet.spawn(F.rank_exit, args=(code,), devices="cpu", nprocs=2, kill_grace=1.0)
    assert info.value.exit_code == code and info.value.signal_name is None


def test_the_exceptions_pickle_and_are_built_as_torch_builds_them():
    raised = gpufleet.ProcessRaisedException("\n\n-- Process 1 terminated with the following error:\ntb", 1, 4242)
    exited = gpufleet.ProcessExitedException("process 2 terminated with signal SIGKILL", 2, 77, -9, "SIGKILL")
    exited.add_note("rank 2 ran on cuda:2 (pid 77)")
    for e in (raised, exited):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.msg == e.msg
        assert (back.error_index, back.pid, back.error_pid) == (e.error_index, e.pid, e.pid)
        assert isinstance(back, gpufleet.ProcessException)
    back = pickle.loads(pickle.dumps(exited))
    assert (back.exit_code, back.signal_name, back.__notes__) == (-9, "SIGKILL", ["rank 2 ran on cuda:2 (pid 77)"])
