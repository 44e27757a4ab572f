"""``spawn``: one fresh process per device running ``fn(rank, *args)``, with
``torch.multiprocessing.spawn``'s contract (its exceptions, messages, exit rules and ``join=False``
context), the environment torchrun sets, and the rank's GPU in ``CUDA_VISIBLE_DEVICES``.

torch's rules, which these follow: a rank that returns, or calls ``sys.exit(0)``, succeeded; one
that raises sends its traceback and exits with 1 (``ProcessRaisedException``); any other non-zero
exit or a signal is ``ProcessExitedException`` ("process 0 terminated with exit code 3" / "with
signal SIGABRT", then the device and pid in parentheses). On the first failure the other ranks get
the kill sequence (SIGTERM, grace, SIGKILL). The exceptions carry ``msg``, ``error_index`` (the rank), ``pid`` (also ``error_pid``) and
pickle. Multiprocessing queues, events and locks made with ``multiprocessing.get_context("spawn")``
may be passed in ``args`` (inherited by each rank, as torch does); one from the default (fork)
context raises ``SerializationError`` saying so.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Optional

from . import _ipc, _serialize
from ._spawn import Supervised, start_worker, stop_group

__all__ = ["spawn", "SpawnContext", "ProcessException", "ProcessRaisedException", "ProcessExitedException"]


class ProcessException(Exception):
    """A spawned rank failed: ``msg``, ``error_index`` (its rank, also ``rank``) and ``pid`` (also
    ``error_pid``), as ``torch.multiprocessing.ProcessException``; the device is in ``__notes__``."""

    def __init__(self, msg: str, error_index: int, error_pid: int):
        super().__init__(msg)
        self.msg = msg
        self.error_index = error_index
        self.pid = error_pid

    @property
    def error_pid(self) -> int:
        return self.pid

    @property
    def rank(self) -> int:
        return self.error_index

    def _args(self) -> tuple:
        return self.msg, self.error_index, self.pid

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("msg", "error_index", "pid")}
        return type(self), self._args(), state


class ProcessRaisedException(ProcessException):
    """A rank raised; the message ends with its traceback."""


class ProcessExitedException(ProcessException):
    """A rank exited with a non-zero code or was killed by a signal: ``exit_code`` (negative for a
    signal) and ``signal_name``."""

    def __init__(self, msg: str, error_index: int, error_pid: int, exit_code: int, signal_name: Optional[str] = None):
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name

    def _args(self) -> tuple:
        return self.msg, self.error_index, self.pid, self.exit_code, self.signal_name

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("msg", "error_index", "pid", "exit_code", "signal_name")}
        return type(self), self._args(), state


def rank_failure(rank: int, device: str, pid: int, message: Optional[tuple], code: int) -> ProcessException:
    """torch's exception for a rank that ended with ``code`` after sending ``message`` (its last word,
    ("error", traceback) when it raised), with the device added where torch's own tests leave room
    (they match the traceback's last line at the very end, so the device goes in the header)."""
    where = f"{device}, pid {pid}"
    if message is not None and message[0] == "error":
        exc: ProcessException = ProcessRaisedException(
            f"\n\n-- Process {rank} ({where}) terminated with the following error:\n{message[1]}", rank, pid)
    elif code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        exc = ProcessExitedException(f"process {rank} terminated with signal {name} ({where})", rank, pid, code, name)
    else:
        exc = ProcessExitedException(f"process {rank} terminated with exit code {code} ({where})", rank, pid, code)
    exc.device = device
    return exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the kernel's choice, so two jobs never pick the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Rank:
    def __init__(self, rank: int, device: str, proc, sock):
        self.rank, self.device, self.proc = rank, device, proc
        self.chan = _ipc.Channel(sock)
        self.message = None
        self.done = False
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def fds(self) -> list:
        return [self.chan.sock] + ([self.pidfd] if self.pidfd is not None else [])

    def collect(self) -> None:
        """Reads the rank's last word (its traceback or "ok") if it sent one before it ended."""
        try:
            while self.message is None:
                header, _ = self.chan.recv()
                self.message = header
        except (EOFError, OSError):
            pass

    def close(self) -> None:
        self.chan.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class SpawnContext:
    """The running ranks of ``spawn(..., join=False)``: ``processes``, ``pids()``, ``join(timeout)``
    as torch's ``ProcessContext``."""

    def __init__(self, ranks: list, sup: Supervised, grace: float):
        self._ranks = ranks
        self.processes = [r.proc for r in ranks]
        self._sup = sup
        self._grace = grace
        self._closed = False

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for the ranks; True when all ended well, False when ``timeout`` passed first. On the
        first failure the other ranks get the kill sequence and the failure is raised."""
        from multiprocessing.connection import wait as mp_wait

        end = None if timeout is None else time.monotonic() + timeout
        while not all(r.done for r in self._ranks):
            left = None if end is None else max(0.0, end - time.monotonic())
            pending = {fd: r for r in self._ranks if not r.done for fd in r.fds()}
            ready = mp_wait(list(pending), timeout=left)
            if not ready:
                return False
            for fd in ready:
                r = pending[fd]
                if r.done:
                    continue
                if fd is r.chan.sock and r.proc.poll() is None:
                    try:
                        r.message = r.chan.recv()[0]  # its last word; it exits right after
                    except (EOFError, OSError):
                        pass
                    if r.message is None or r.message[0] != "error":
                        continue
                r.collect()
                code = r.proc.wait()
                r.done = True
                if code != 0:
                    self._fail(r, code)
        self._close()
        return True

    def _fail(self, r: _Rank, code: int) -> None:
        stop_group(self.processes, self._grace)
        for other in self._ranks:
            other.done = True
        self._close()
        raise rank_failure(r.rank, r.device, r.proc.pid, r.message, code)

    def _stop(self) -> None:
        """Every rank gets the kill sequence (Ctrl-C while ``spawn`` joins)."""
        stop_group(self.processes, self._grace)
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            for r in self._ranks:
                r.close()
                self._sup.forget(r.proc)
            self._sup.close()


def spawn(fn: Callable, args: tuple = (), nprocs: Optional[int] = None, devices: Any = "auto", join: bool = True,
          master_port: Optional[int] = None, master_addr: str = "127.0.0.1", kill_grace: float = 5.0,
          cluster: Optional[str] = None):
    """Runs ``fn(rank, *args)`` in one fresh process per device, with ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (a free port when none is
    given) and ``CUDA_VISIBLE_DEVICES`` (that rank's GPU) set before it starts; ``fn`` may be a
    lambda or a function from ``__main__`` or a notebook (Note [Callables by value]). Failures as
    ``torch.multiprocessing.spawn`` reports them (see the module's docstring). ``join=False``
    returns a ``SpawnContext``. ``devices="cpu"`` runs ``nprocs`` ranks without GPUs.

    ``cluster`` (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``; the ``ray`` extra): the ranks go
    to GPUs of a Ray cluster, one each (``nprocs`` defaults to all of them), placed by Ray, with
    ``MASTER_ADDR`` and ``MASTER_PORT`` those of rank 0's node (Note [Ranks on a cluster] in
    gpufleet/cluster/_spawn.py)."""
    from ._executor import _pool, _preparation

    if cluster is not None:
        if devices != "auto" or master_addr != "127.0.0.1":
            raise ValueError("spawn(cluster=...) places the ranks on the cluster's GPUs, with MASTER_ADDR rank 0's "
                             "node: leave devices='auto' and master_addr unset")
        from .cluster import _spawn as _on_ray  # Note [Optional extras]: ray is checked there first

        return _on_ray.spawn(fn, args, nprocs, join, master_port, kill_grace, cluster)

    if devices == "cpu":
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"spawn(devices='cpu') needs nprocs >= 1, got {nprocs!r}")
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
    # pickled once, before any rank starts; queues from a spawn context are inherited by each rank
    payload, fds = _serialize.dumps_for_child((fn, tuple(args)), "the function and args of spawn()")
    port = master_port if master_port is not None else free_port(master_addr)
    sup = Supervised(kill_grace)
    ranks: list[_Rank] = []
    prep = _preparation("gpufleet-spawn")
    try:
        for rank, (name, visible) in enumerate(pool):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                   "LOCAL_WORLD_SIZE": str(nprocs), "GROUP_RANK": "0", "MASTER_ADDR": master_addr,
                   "MASTER_PORT": str(port), "GPUFLEET_DEVICE": name, "GPUFLEET_SLOT": "0",
                   "GPUFLEET_WORKER": str(rank), "CUDA_VISIBLE_DEVICES": visible}
            p, sock = start_worker(sup, env, pass_fds=fds)
            r = _Rank(rank, name, p, sock)
            ranks.append(r)
            r.chan.send(("hello", prep, "spawn", {"rank": rank, "device": name, "slot": 0, "world_size": nprocs}),
                        payload)
    except BaseException:
        stop_group([r.proc for r in ranks], kill_grace)
        for r in ranks:
            r.close()
        sup.close()
        raise
    return joined(SpawnContext(ranks, sup, kill_grace), join)


def joined(ctx, join: bool):
    """``spawn``'s ending, local or on a cluster: the context itself (``join=False``), or None once
    every rank ended well; a Ctrl-C while joining stops every rank (``ctx._stop()``)."""
    if not join:
        return ctx
    try:
        while not ctx.join():
            pass
    except KeyboardInterrupt:
        ctx._stop()
        raise
    return None
