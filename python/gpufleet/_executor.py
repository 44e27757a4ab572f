"""Python callables on GPUs: ``GPUExecutor`` (a ``concurrent.futures.Executor`` with one fresh
process per GPU slot), ``spawn`` (one process per device running ``fn(rank, *args)``, like
``torch.multiprocessing.spawn``) and ``worker_info``."""
from __future__ import annotations

import atexit
import itertools
import multiprocessing.spawn
import os
import pickle
import queue
import socket
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import _devices, _ipc, _serialize
from ._serialize import SerializationError
from ._spawn import Supervised, describe_exit, start_worker, stop_group

__all__ = ["GPUExecutor", "WorkerInfo", "WorkerDiedError", "RemoteTraceback", "SerializationError", "worker_info", "spawn",
           "SpawnContext", "ProcessRaisedException", "ProcessExitedException"]


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


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as the ``__cause__`` of the re-raised one)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class WorkerDiedError(RuntimeError):
    """A worker process died (signal, ``os._exit``, OOM kill) while running a call."""

    def __init__(self, message: str, device: str, exitcode: Optional[int]):
        super().__init__(message)
        self.device = device
        self.exitcode = exitcode


def _rebuild(blob, tb: str, summary: str, where: str) -> BaseException:
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(summary)
    exc.__cause__ = RemoteTraceback(tb)
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in {where}")
    return exc


def _preparation(name: str) -> dict:
    """multiprocessing's own preparation data (sys.path, cwd, the parent's __main__) for a fresh worker."""
    data = multiprocessing.spawn.get_preparation_data(name)
    if "authkey" in data:
        data["authkey"] = bytes(data["authkey"])
    return data


def _pool(devices) -> list[tuple[str, str]]:
    """(name, CUDA_VISIBLE_DEVICES value) per device of the pool."""
    from ._dispatch import _resolve_devices
    from . import _core

    return [(f"cuda:{d.ordinal}", d.visible_id) for d in _core.make_pool(_resolve_devices(devices))]


@dataclass
class _Ev:  # the fields RunReport._attempt reads
    seq: int
    name: str
    attempt: int
    slot: int
    start: float
    end: float
    status: str


# ---- the executor --------------------------------------------------------------------------------

class _Worker:
    def __init__(self, ex: "GPUExecutor", index: int, device: str, visible: str, slot: int):
        self.ex, self.index, self.device, self.visible, self.slot = ex, index, device, visible, slot
        self.proc = None
        self.inbox = self.outbox = self.chan = None
        self.tasks_done = 0

    def start(self) -> None:
        self.proc, self.outbox, self.inbox = start_worker(
            self.ex._sup, {"CUDA_VISIBLE_DEVICES": self.visible, "GPUFLEET_DEVICE": self.device,
                           "GPUFLEET_SLOT": str(self.slot), "GPUFLEET_WORKER": str(self.index)})
        self.chan = _ipc.Channel(self.inbox, self.outbox, os.getpid())
        self.outbox.send(_preparation("gpufleet-worker"))
        self.outbox.send(("executor", {"rank": self.index, "device": self.device, "slot": self.slot,
                                       "owner": os.getpid()}))
        self.tasks_done = 0
        if self.ex._init_payload is not None:
            self.chan.send(("init", -1), self.ex._init_payload)

    def where(self) -> str:
        pid = self.proc.pid if self.proc else "?"
        return f"gpufleet worker {self.index} on {self.device} (CUDA_VISIBLE_DEVICES={self.visible}, pid {pid})"

    def stop(self, graceful: bool) -> None:
        if self.proc is None:
            return
        if graceful and self.proc.poll() is None:
            try:
                self.chan.send(None)
                self.proc.wait(timeout=self.ex._grace)
            except Exception:
                pass
        stop_group([self.proc], self.ex._grace)
        self.ex._sup.forget(self.proc)
        for c in (self.inbox, self.outbox):
            try:
                c.close()
            except Exception:
                pass
        self.proc = None

    def died(self) -> WorkerDiedError:
        code = self.proc.wait()
        return WorkerDiedError(f"{self.where()} died ({describe_exit(code)}) while running a call; it was replaced",
                               self.device, code)

    def loop(self) -> None:
        ex = self.ex
        while True:
            item = ex._queue.get()
            if item is None:
                self.stop(graceful=True)
                return
            fut, payload, name = item
            item = None
            if not fut.set_running_or_notify_cancel():
                continue
            started = time.time()
            try:
                if self.proc is None:
                    self.start()
                sent = self.chan.send(("task", 0), payload)  # Note [Out-of-band buffers]
                payload = None
                reply = None
                while reply is None:
                    try:
                        msg, body = self.chan.recv()
                    except (EOFError, OSError):
                        _ipc.discard(sent)  # the arguments' file, if it died before reading it
                        err = self.died()
                        self.stop(graceful=False)
                        fut.set_exception(err)
                        break
                    if msg[0] == "init_error":
                        _, _, blob, tb, summary = msg
                        fut.set_exception(_rebuild(blob, tb, summary, f"the initializer of {self.where()}"))
                        self.stop(graceful=False)
                        break
                    reply = msg
                if reply is not None:
                    self.tasks_done += 1
                    if reply[0] == "ok":
                        fut.set_result(body.load())
                    else:
                        _, _, blob, tb, summary = reply
                        fut.set_exception(_rebuild(blob, tb, summary, self.where()))
                    body = None
                    if ex._max_tasks and self.tasks_done >= ex._max_tasks:
                        self.stop(graceful=True)  # recycled: memory a library never freed comes back
            except BaseException as e:  # pickling errors of the arguments, broken pipes
                if not fut.done():
                    fut.set_exception(e)
                if self.proc is not None and self.proc.poll() is not None:
                    self.stop(graceful=False)
            finally:
                ex._record(fut, self, started, name)
                fut = None


def _process_chunk(fn, chunk):
    return [fn(*args) for args in chunk]


class GPUExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose workers are fresh processes, ``slots_per_device`` per
    GPU, each started with ``CUDA_VISIBLE_DEVICES`` naming its own GPU (so ``cuda:0`` inside is that
    GPU). ``initializer(*initargs)`` runs once per worker (load the model once per GPU). Calls are
    taken from one shared queue by whichever worker is free. An exception comes back with the remote
    traceback and the device named; a worker that dies fails its call with ``WorkerDiedError`` and is
    replaced; ``max_tasks_per_worker`` recycles workers. On a machine without GPUs ``devices`` may be
    ``"cpu"`` with ``workers=N`` (or simulate GPUs)."""

    def __init__(self, devices: Any = "auto", slots_per_device: int = 1, initializer: Optional[Callable] = None,
                 initargs: tuple = (), max_tasks_per_worker: Optional[int] = None, *, workers: Optional[int] = None,
                 kill_grace: float = 5.0, progress: bool = False, report: bool = False):
        if max_tasks_per_worker is not None and (isinstance(max_tasks_per_worker, bool)
                                                 or not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1):
            raise ValueError(f"max_tasks_per_worker must be None or an int >= 1, got {max_tasks_per_worker!r}")
        if isinstance(slots_per_device, bool) or not isinstance(slots_per_device, int) or slots_per_device < 1:
            raise ValueError(f"slots_per_device must be an int >= 1, got {slots_per_device!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        # pickled once, here: an initializer that cannot travel fails the constructor (Note [Callables by value])
        self._init_payload = (None if initializer is None else
                              _serialize.dumps_call(initializer, tuple(initargs), {}, "the initializer"))
        if devices == "cpu":
            n = workers or os.cpu_count() or 1
            pool = [("cpu", "")] * n
            slots_per_device = 1
        else:
            pool = _pool(devices)
            if not pool:
                raise ValueError("GPUExecutor: no GPU visible (devices='auto' found none); pass devices='cpu' with "
                                 "workers=N to run on the CPU, or simulate GPUs with gpufleet.simulate_gpus")
        self._initializer, self._initargs = initializer, initargs
        self._max_tasks = max_tasks_per_worker
        self._grace = kill_grace
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._sup = Supervised(kill_grace)
        self._shutdown = False
        self._lock = threading.Lock()
        self._progress = progress
        self._calls = self._failed = 0
        self._report = None
        self._bar = None
        if progress or report:
            from . import _core
            from ._dispatch import RunReport, _resolve_devices

            gpu_pool = [] if devices == "cpu" else _core.make_pool(_resolve_devices(devices))
            self._report = RunReport(gpu_pool, slots_per_device, 100_000)
        if progress:
            from ._progress import Bar

            self._bar = Bar(unit="call", desc="gpufleet executor")  # Note [Progress modes]
        self._workers = []
        for slot in range(slots_per_device):
            for name, visible in pool:
                self._workers.append(_Worker(self, len(self._workers), name, visible, slot))
        for w in self._workers:
            w.start()  # eagerly: initializers run while the first calls are submitted
        self._threads = [threading.Thread(target=w.loop, name=f"gpufleet-executor-{w.index}", daemon=True)
                         for w in self._workers]
        for t in self._threads:
            t.start()
        _live_executors.add(self)

    @property
    def workers(self) -> list[tuple[str, int]]:
        """(device, pid) of each live worker."""
        return [(w.device, w.proc.pid) for w in self._workers if w.proc is not None]

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Schedules ``fn(*args, **kwargs)``. The call is pickled here, in the caller's thread
        (Note [Callables by value]): lambdas, closures and functions from ``__main__`` or a notebook
        travel by value; something that cannot be pickled raises ``SerializationError`` now."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a GPUExecutor after shutdown")
        payload = _serialize.dumps_call(fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a GPUExecutor after shutdown")
            fut: Future = Future()
            self._queue.put((fut, payload, getattr(fn, "__name__", "call")))
            return fut

    def map(self, fn: Callable, *iterables, timeout: Optional[float] = None, chunksize: int = 1):
        """Like ``ProcessPoolExecutor.map``: results in order; ``chunksize`` items travel per message."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        import functools

        it = zip(*iterables)
        chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
        results = super().map(functools.partial(_process_chunk, fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def _record(self, fut: Future, w: _Worker, start: float, name: str) -> None:
        if not self._progress and self._report is None:
            return
        with self._lock:
            seq = self._calls
            self._calls += 1
            ok = fut.done() and not fut.cancelled() and fut.exception() is None
            if not ok and fut.done() and not fut.cancelled():
                self._failed += 1
            if self._report is not None:
                from ._dispatch import AttemptRecord, TaskRecord

                devs = [w.device] if w.device != "cpu" else []
                status = "succeeded" if ok else "failed"
                end = time.time()
                self._report._attempt(_Ev(seq, name, 1, w.slot, start, end, status), devs)
                self._report._final(TaskRecord(seq, name, status, devs, w.slot, start, end, 1,
                                               message="" if ok else repr(fut.exception())))
            if self._bar is not None:
                self._bar.set_postfix_str(f"failed={self._failed}", refresh=False)
                self._bar.update(1)

    def report(self):
        """The ``RunReport`` of the calls so far (per call: device, slot, times, status; per device:
        busy fraction, calls, failures). Needs ``GPUExecutor(..., progress=True)`` or ``report=True``."""
        if self._report is None:
            raise RuntimeError("this GPUExecutor keeps no report: create it with progress=True or report=True")
        self._report.finished = time.time()
        return self._report

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown and not wait:
                return
            first = not self._shutdown
            self._shutdown = True
        if first:
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._workers:
                self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._sup.close()
            _ipc.cleanup(os.getpid())  # buffers sent to a worker that died before reading them
            _live_executors.discard(self)

    def _kill(self) -> None:
        """Interpreter exit or Ctrl-C: the kill sequence on every worker now."""
        self.shutdown(wait=False, cancel_futures=True)
        stop_group([p for p in (w.proc for w in self._workers) if p is not None], self._grace)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is KeyboardInterrupt:
            self._kill()
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


_live_executors: "weakref.WeakSet[GPUExecutor]" = weakref.WeakSet()


@atexit.register
def _kill_live_executors() -> None:
    for ex in list(_live_executors):
        try:
            ex._kill()
        except Exception:
            pass


# ---- spawn ----------------------------------------------------------------------------------------

class ProcessRaisedException(Exception):
    """A spawned rank raised: ``rank``, the remote traceback in the message (as torch does)."""

    def __init__(self, msg: str, rank: int, pid: int):
        super().__init__(msg)
        self.rank = rank
        self.error_index = rank
        self.pid = pid


class ProcessExitedException(Exception):
    """A spawned rank exited with a non-zero code or was killed by a signal."""

    def __init__(self, msg: str, rank: int, pid: int, exit_code: int, signal_name: Optional[str] = None):
        super().__init__(msg)
        self.rank = rank
        self.error_index = rank
        self.pid = pid
        self.exit_code = exit_code
        self.signal_name = signal_name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the kernel's choice, so two jobs never pick the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SpawnContext:
    """The running ranks of ``spawn(..., join=False)``; ``join()`` like torch's ProcessContext."""

    def __init__(self, procs, conns, devices, sup: Supervised, grace: float):
        self.processes = procs
        self._conns = conns
        self._devices = devices
        self._sup = sup
        self._grace = grace
        self._done = [False] * len(procs)
        self._closed = False

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for every rank; True when all finished. On the first failure the other ranks get the
        kill sequence and the failure is raised."""
        from multiprocessing.connection import wait as mp_wait

        end = None if timeout is None else time.monotonic() + timeout
        while not all(self._done):
            left = None if end is None else max(0.0, end - time.monotonic())
            pending = [c for c, d in zip(self._conns, self._done) if not d]
            ready = mp_wait(pending, timeout=left)
            if not ready:
                return False
            for c in ready:
                rank = self._conns.index(c)
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    msg = None
                p = self.processes[rank]
                code = p.wait()
                self._done[rank] = True
                if msg is not None and msg[0] == "ok" and code == 0:
                    continue
                self._fail_others(rank)
                where = f"rank {rank} on {self._devices[rank]} (pid {p.pid})"
                if msg is not None and msg[0] == "error":
                    raise ProcessRaisedException(f"\n\n-- Process {rank} terminated with the following error "
                                                 f"({where}):\n{msg[2]}", rank, p.pid)
                sig = None
                if code < 0:
                    import signal as _signal

                    sig = _signal.Signals(-code).name
                raise ProcessExitedException(f"process {rank} terminated with {describe_exit(code)} ({where})", rank,
                                             p.pid, code, sig)
        self._close()
        return True

    def _fail_others(self, rank: int) -> None:
        stop_group(self.processes, self._grace)
        self._done = [True] * len(self.processes)
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            for c in self._conns:
                c.close()
            for p in self.processes:
                self._sup.forget(p)
            self._sup.close()


def spawn(fn: Callable, args: tuple = (), nprocs: Optional[int] = None, devices: Any = "auto", join: bool = True,
          master_port: Optional[int] = None, master_addr: str = "127.0.0.1", kill_grace: float = 5.0):
    """Runs ``fn(rank, *args)`` in one fresh process per device, with ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (a free port when none is
    given) and ``CUDA_VISIBLE_DEVICES`` (that rank's GPU) set before it starts. On the first failure
    the other ranks are stopped (SIGTERM, grace, SIGKILL) and ``ProcessRaisedException`` (with the
    rank's traceback) or ``ProcessExitedException`` (exit code or signal) is raised, as
    ``torch.multiprocessing.spawn`` does. ``join=False`` returns a ``SpawnContext``.
    ``devices="cpu"`` runs ``nprocs`` ranks without GPUs."""
    if devices == "cpu":
        if not nprocs:
            raise ValueError("spawn(devices='cpu') needs nprocs")
        pool = [("cpu", "")] * nprocs
    else:
        pool = _pool(devices)
        if nprocs is None:
            nprocs = len(pool)
        if nprocs < 1 or nprocs > len(pool):
            raise ValueError(f"spawn: nprocs={nprocs} but {len(pool)} device{'s' if len(pool) != 1 else ''} "
                             f"{'is' if len(pool) == 1 else 'are'} available ({', '.join(n for n, _ in pool) or 'none'}); "
                             "one process per device")
        pool = pool[:nprocs]
    # pickled once, before any rank starts (Note [Callables by value] in _serialize.py)
    blob = _serialize.dumps_checked((fn, tuple(args)), "the function and args of spawn()", out_of_band=False).data
    port = master_port if master_port is not None else free_port(master_addr)
    sup = Supervised(kill_grace)
    procs, conns = [], []
    prep = _preparation("gpufleet-spawn")
    for rank, (name, visible) in enumerate(pool):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs),
               "GROUP_RANK": "0", "MASTER_ADDR": master_addr, "MASTER_PORT": str(port), "GPUFLEET_DEVICE": name,
               "GPUFLEET_SLOT": "0", "GPUFLEET_WORKER": str(rank)}
        env["CUDA_VISIBLE_DEVICES"] = visible
        p, outbox, inbox = start_worker(sup, env)
        outbox.send(prep)
        outbox.send(("spawn", {"rank": rank, "device": name, "slot": 0, "world_size": nprocs}))
        outbox.send_bytes(blob)
        outbox.close()
        procs.append(p)
        conns.append(inbox)
    ctx = SpawnContext(procs, conns, [n for n, _ in pool], sup, kill_grace)
    if not join:
        return ctx
    try:
        while not ctx.join():
            pass
    except KeyboardInterrupt:
        ctx._fail_others(-1)
        raise
    return None
