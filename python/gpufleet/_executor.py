"""Python callables on GPUs: ``GPUExecutor`` (a ``concurrent.futures.Executor`` with one fresh
process per GPU slot) and ``worker_info``; ``spawn`` lives in _spawn_api.py, the engine that runs
the workers in _executor_io.py (Note [Calls in flight]), the transport in _ipc.py (Note
[Shared-memory arenas]), serialisation in _serialize.py (Note [Callables by value])."""
from __future__ import annotations

import concurrent.futures.process
import itertools
import multiprocessing.spawn
import os
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import _executor_io as _io, _serialize
from ._executor_calls import BrokenGPUExecutor, Call, Fn, MapJob, WorkerDiedError
from ._serialize import SerializationError
from ._spawn_api import (ProcessException, ProcessExitedException, ProcessRaisedException, SpawnContext, spawn)
from ._spawn_api import free_port  # noqa: F401 - gpufleet.cli.launch imports it from here

__all__ = ["GPUExecutor", "WorkerInfo", "WorkerDiedError", "BrokenGPUExecutor", "RemoteTraceback",
           "SerializationError", "worker_info", "spawn", "SpawnContext", "ProcessException", "ProcessRaisedException",
           "ProcessExitedException"]


@dataclass(frozen=True)
class WorkerInfo:
    """Where the current worker runs: ``device`` as the parent names it (``"cuda:2"``), the
    ``CUDA_VISIBLE_DEVICES`` it was given, its ``rank`` (worker number or spawn rank), ``slot`` on its
    device, ``world_size`` (spawn) and ``pid``."""

    rank: int
    device: str
    visible_devices: str
    slot: int
    world_size: int
    pid: int


_worker_info: Optional[WorkerInfo] = None


def _set_worker_info(info: dict) -> None:
    global _worker_info
    _worker_info = WorkerInfo(info["rank"], info["device"], os.environ.get("CUDA_VISIBLE_DEVICES", ""), info["slot"],
                              info.get("world_size", 0), os.getpid())


def worker_info() -> Optional[WorkerInfo]:
    """Inside a ``GPUExecutor`` worker or a ``spawn`` rank: where it runs; elsewhere ``None``."""
    return _worker_info


class _OwnRemoteTraceback(Exception):
    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# The traceback of an exception raised in a worker, set as the ``__cause__`` of the re-raised one:
# ProcessPoolExecutor's own class (code that checks the cause's type finds what it expects), ours
# where a Python lacks it.
RemoteTraceback = getattr(concurrent.futures.process, "_RemoteTraceback", _OwnRemoteTraceback)


def _rebuild(blob, tb: str, summary: str, where: str) -> BaseException:
    exc = None
    if blob is not None:
        try:
            exc = _serialize.loads(blob)
        except BaseException:  # noqa: BLE001 - its class does not exist here, or its __reduce__ fails
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(summary)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in {where}")
    return exc


def _preparation(name: str = "gpufleet-worker") -> dict:
    """multiprocessing's own preparation data (sys.path, cwd, argv) for a fresh worker."""
    data = multiprocessing.spawn.get_preparation_data(name)
    if "authkey" in data:
        data["authkey"] = bytes(data["authkey"])
    return data


def _pool(devices) -> list[tuple[str, str]]:
    """(name, CUDA_VISIBLE_DEVICES value) per device of the pool."""
    from ._dispatch import _resolve_devices
    from . import _core

    return [(f"cuda:{d.ordinal}", d.visible_id) for d in _core.make_pool(_resolve_devices(devices))]


def _count(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value}")
    return value


@dataclass
class _Ev:  # the fields RunReport._attempt reads
    seq: int
    name: str
    attempt: int
    slot: int
    start: float
    end: float
    status: str


class _Recorder:
    """Progress (Note [Progress modes] in _progress.py) and the RunReport, fed by the engine thread."""

    def __init__(self, report, bar):
        self.report, self.bar = report, bar
        self.lock = threading.Lock()
        self.calls = self.failed = 0

    def __call__(self, name: str, device: str, slot: int, start: float, end: float, error) -> None:
        with self.lock:
            seq = self.calls
            self.calls += 1
            self.failed += error is not None
            if self.report is not None:
                from ._dispatch import TaskRecord

                from ._dispatch_report import node_of

                devs = [device] if device != "cpu" else []
                status = "succeeded" if error is None else "failed"
                self.report._attempt(_Ev(seq, name, 1, slot, start, end, status), devs)
                self.report._final(TaskRecord(seq, name, status, devs, slot, start, end, 1,
                                              message="" if error is None else repr(error), node=node_of(device)))
            if self.bar is not None:
                self.bar.set_postfix_str(f"failed={self.failed}", refresh=False)
                self.bar.update(1)


class _WorkerProcess:
    """``ProcessPoolExecutor._processes``' values for code that inspects or stops workers."""

    def __init__(self, popen):
        self._p = popen
        self.pid = popen.pid

    @property
    def exitcode(self):
        return self._p.poll()

    def is_alive(self) -> bool:
        return self._p.poll() is None

    def terminate(self) -> None:
        self._p.terminate()

    def kill(self) -> None:
        self._p.kill()

    def join(self, timeout: Optional[float] = None) -> None:
        import subprocess

        try:
            self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


class GPUExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose workers are fresh processes, ``slots_per_device`` per
    GPU, each started with ``CUDA_VISIBLE_DEVICES`` naming its own GPU (so ``cuda:0`` inside is that
    GPU). ``initializer(*initargs)`` runs once per worker (load the model once per GPU); if it
    raises, the executor is broken (``BrokenGPUExecutor``), as ``ProcessPoolExecutor`` does. Calls
    are taken from one shared queue, several in flight per worker (Note [Calls in flight]). Functions
    from ``__main__``, a notebook, lambdas and closures travel by value (Note [Callables by value]);
    large NumPy arrays through shared memory (Note [Shared-memory arenas]). An exception comes back
    with the remote traceback and the device named; a worker that dies fails the call it ran with
    ``WorkerDiedError`` (a ``BrokenProcessPool``) and is replaced; ``max_tasks_per_worker``
    recycles workers. On a machine without GPUs ``devices="cpu"`` with ``workers=N`` (or
    ``max_workers=N``, ProcessPoolExecutor's name) runs N CPU workers (or simulate GPUs).

    ``cluster`` (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``; the ``ray`` extra): the workers
    are Ray actors, one per slot of every GPU of a Ray cluster, with the same contract (Note
    [Executor on a cluster] in gpufleet/cluster/_executor.py)."""

    def __init__(self, devices: Any = "auto", slots_per_device: int = 1, initializer: Optional[Callable] = None,
                 initargs: tuple = (), max_tasks_per_worker: Optional[int] = None, *, workers: Optional[int] = None,
                 max_workers: Optional[int] = None, kill_grace: float = 5.0, progress: bool = False,
                 report: bool = False, cluster: Optional[str] = None):
        if workers is not None and max_workers is not None:
            raise TypeError("give workers or max_workers (the same thing), not both")
        n = _count(workers, "workers") if max_workers is None else _count(max_workers, "max_workers")
        _count(max_tasks_per_worker, "max_tasks_per_worker")
        if isinstance(slots_per_device, bool) or not isinstance(slots_per_device, int) or slots_per_device < 1:
            raise ValueError(f"slots_per_device must be an int >= 1, got {slots_per_device!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        if cluster is not None:
            if devices != "auto" or n is not None:
                raise ValueError("GPUExecutor(cluster=...) runs slots_per_device workers on every GPU of the cluster: "
                                 "leave devices='auto' and workers/max_workers unset")
            self._cluster_engine(cluster, slots_per_device, initializer, initargs, max_tasks_per_worker, progress,
                                 report)
            return
        if devices == "cpu":
            pool = [("cpu", "")] * (n or os.cpu_count() or 1)
            slots_per_device = 1
        else:
            if n is not None:
                raise ValueError(f"workers={n} applies to devices='cpu'; on GPUs the pool is slots_per_device "
                                 "workers per device")
            pool = _pool(devices)
            if not pool:
                raise ValueError("GPUExecutor: no GPU visible (devices='auto' found none); pass devices='cpu' with "
                                 "workers=N to run on the CPU, or simulate GPUs with gpufleet.simulate_gpus")
        init = None
        if initializer is not None:
            # pickled once, here (an initializer that cannot travel fails the constructor); queues
            # from multiprocessing.get_context("spawn") in initargs reach every worker
            payload, fds = _serialize.dumps_for_child((initializer, tuple(initargs), {}),
                                                      "the initializer and initargs of GPUExecutor()")
            init = (payload, fds, initargs)
        report_obj = bar = None
        if progress or report:
            from . import _core
            from ._dispatch import RunReport, _resolve_devices

            gpu_pool = [] if devices == "cpu" else _core.make_pool(_resolve_devices(devices))
            report_obj = RunReport(gpu_pool, slots_per_device, 100_000)
        if progress:
            from ._progress import Bar

            bar = Bar(unit="call", desc="gpufleet executor")  # Note [Progress modes]
        self._recorder = _Recorder(report_obj, bar) if report_obj is not None else None
        places = [(name, visible, slot) for slot in range(slots_per_device) for name, visible in pool]
        self._engine = _io.Engine(places, init=init, grace=kill_grace, max_tasks=max_tasks_per_worker,
                                  rebuild=_rebuild, prep=_preparation, record=self._recorder)
        # dropped without shutdown(): the engine finishes the queued calls and stops the workers
        weakref.finalize(self, self._engine.shutdown, False)

    def _cluster_engine(self, cluster, slots_per_device, initializer, initargs, max_tasks, progress, report) -> None:
        from .cluster import _executor as _on_ray  # Note [Optional extras]: ray is checked there first

        init = None
        if initializer is not None:  # pickled once, here: one that cannot travel fails the constructor
            init = _serialize.dumps_checked((initializer, tuple(initargs), {}),
                                            "the initializer and initargs of GPUExecutor()")
        self._recorder = None
        recorder_box: list = []
        self._engine = _on_ray.RayEngine(cluster, slots_per_device, init=init, max_tasks=max_tasks, rebuild=_rebuild,
                                         record=lambda *a: recorder_box[0](*a) if recorder_box else None)
        if progress or report:
            from ._dispatch import RunReport

            bar = None
            if progress:
                from ._progress import Bar

                bar = Bar(unit="call", desc="gpufleet executor")  # Note [Progress modes]
            self._recorder = _Recorder(RunReport(self._engine.pool(), slots_per_device, 100_000), bar)
            recorder_box.append(self._recorder)
        weakref.finalize(self, self._engine.shutdown, False)

    # ---- the Executor interface ---------------------------------------------------------------
    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Schedules ``fn(*args, **kwargs)``. The call is pickled here, in the caller's thread
        (Note [Callables by value]): lambdas, closures and functions from ``__main__`` or a notebook
        travel by value; something that cannot be pickled raises ``SerializationError`` now."""
        self._engine.check()
        fn_payload, args_payload = _serialize.dumps_call(fn, args, kwargs)
        fut: Future = Future()
        self._engine.put([Call(self._fn(fn_payload), args_payload, fut, 0, _name(fn))])
        return fut

    def map(self, fn: Callable, *iterables, timeout: Optional[float] = None, chunksize: int = 1):
        """Like ``ProcessPoolExecutor.map``: every item is pickled now (an item that cannot be raises
        ``SerializationError`` here), results come in order; ``chunksize`` items travel per message;
        ``timeout`` (seconds from this call) raises ``TimeoutError`` from the iterator."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._engine.check()
        fobj = self._fn(_serialize.dumps_function(fn, "map()"))
        items = zip(*iterables)
        if chunksize > 1:
            units = [list(c) for c in iter(lambda: list(itertools.islice(items, chunksize)), [])]
            payloads = [_serialize.dumps_args(u, None, "map()") for u in units]
        else:
            payloads = [_serialize.dumps_args(a, {}, f"map() (item {i})") for i, a in enumerate(items)]
        job = MapJob(len(payloads))
        name = _name(fn)
        self._engine.put([Call(fobj, p, job, i, name, chunksize > 1) for i, p in enumerate(payloads)])
        return _results(job, len(payloads), deadline, chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``Executor.shutdown``: queued calls run (or are cancelled with ``cancel_futures``),
        then the workers stop; ``wait`` waits for that."""
        self._engine.shutdown(cancel_futures)
        if wait:
            self._engine.thread.join()
            if self._recorder is not None and self._recorder.bar is not None:
                self._recorder.bar.close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is KeyboardInterrupt:
            self._engine.kill()
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False

    # ---- gpufleet's additions -----------------------------------------------------------------
    @property
    def workers(self) -> list[tuple[str, int]]:
        """(device, pid) of each live worker."""
        return [(s.device, p.pid) for s, p in self._engine.processes()]

    def report(self):
        """The ``RunReport`` of the calls so far (per call: device, slot, times, status; per device:
        busy fraction, calls, failures). Needs ``GPUExecutor(..., progress=True)`` or ``report=True``."""
        if self._recorder is None:
            raise RuntimeError("this GPUExecutor keeps no report: create it with progress=True or report=True")
        self._recorder.report.finished = time.time()
        return self._recorder.report

    @staticmethod
    def _fn(payload):
        """The function of a call as the engine sends it: a small pickle is its own key (sent once
        per worker however often it is submitted); a large one (captured arrays) is keyed per
        ``map``/pipeline stage, or per call for ``submit``."""
        small = not payload.buffers and len(payload.data) <= 8192
        return Fn(payload, payload.data if small else object())

    def _submit_with(self, fobj, *args) -> Future:
        """``submit`` of a function prepared once by ``_prepare`` (process pipelines)."""
        self._engine.check()
        fut: Future = Future()
        self._engine.put([Call(fobj, _serialize.dumps_args(args, {}, "the stage"), fut, 0, "call")])
        return fut

    def _prepare(self, fn: Callable):
        return self._fn(_serialize.dumps_function(fn, "the pipeline stage"))

    # ---- what ProcessPoolExecutor code and CPython's tests inspect ----------------------------
    @property
    def _processes(self) -> dict:
        return {p.pid: _WorkerProcess(p) for _, p in self._engine.processes()}

    @property
    def _broken(self):
        b = self._engine.broken
        return False if b is None else str(b)

    @property
    def _max_workers(self) -> int:
        return len(self._engine.slots)

    def _kill(self) -> None:
        self._engine.kill()


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _results(job, n: int, deadline: Optional[float], chunked: bool):
    """map's iterator; it holds the job only (not the executor), and no result it has yielded."""
    try:
        for i in range(n):
            if chunked:
                yield from job.take(i, deadline)
            else:
                yield job.take(i, deadline)
    finally:
        job.cancelled = True  # what was not sent yet is dropped (the consumer stopped or failed)

