"""What one call of a ``GPUExecutor`` is on its way through the engine (_executor_io.py): the function
pickled once (``Fn``), the call (``Call``) and where its outcome goes (a ``Future``, or a slot of a
``map``'s ``MapJob``), and the two ways the executor itself can fail a call."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional


class WorkerDiedError(BrokenProcessPool):
    """A worker process died (signal, ``os._exit``, OOM kill) while running a call: ``device``
    names its GPU, ``exitcode`` is negative for a signal. It is a ``BrokenProcessPool`` (what
    ``ProcessPoolExecutor`` raises there), but only that call failed: the worker was replaced."""

    def __init__(self, message: str, device: str = "", exitcode: Optional[int] = None):
        super().__init__(message)
        self.device = device
        self.exitcode = exitcode

    def __reduce__(self):
        return type(self), (str(self), self.device, self.exitcode)


class BrokenGPUExecutor(BrokenProcessPool):
    """The executor cannot run calls any more: a worker's initializer raised (the ``__cause__``) or
    a worker could not start. Every queued call and every later ``submit`` fail with it."""


class Fn:
    """A function pickled once: ``key`` identifies it across calls (its pickle, when small)."""

    __slots__ = ("payload", "key", "nbytes")

    def __init__(self, payload, key):
        self.payload, self.key, self.nbytes = payload, key, payload.nbytes


class Call:
    __slots__ = ("fn", "args", "sink", "index", "name", "chunked", "id", "sent", "started", "running")

    def __init__(self, fn: Optional[Fn], args, sink, index: int, name: str, chunked: bool = False):
        self.fn, self.args, self.sink, self.index, self.name, self.chunked = fn, args, sink, index, name, chunked
        self.id = 0
        self.sent = False
        self.started = 0.0
        self.running = False

    def begin(self) -> bool:
        """False when the caller cancelled it before it was sent."""
        if self.running:
            return True
        sink = self.sink
        ok = sink.set_running_or_notify_cancel() if isinstance(sink, Future) else not sink.cancelled
        self.running = ok
        return ok

    def finish(self, ok: bool, value: Any, touched: Optional[set] = None) -> None:
        """Delivers the outcome; a map job's reader is woken at once, or, with ``touched``, once
        per batch of results (the engine calls ``MapJob.wake`` after reading them)."""
        sink = self.sink
        if isinstance(sink, Future):
            if ok:
                sink.set_result(value)
            else:
                sink.set_exception(value)
        elif touched is not None:
            sink.results[self.index] = (ok, value)
            touched.add(sink)
        else:
            sink.set(self.index, ok, value)
        self.args = self.sink = None


class MapJob:
    """The results of one ``map``: slots filled by the engine, read in order by the iterator."""

    __slots__ = ("cond", "results", "cancelled", "waiting")

    def __init__(self, n: int):
        self.cond = threading.Condition(threading.Lock())
        self.results: list = [None] * n
        self.cancelled = False
        self.waiting = -1

    def set(self, i: int, ok: bool, value: Any) -> None:
        with self.cond:
            self.results[i] = (ok, value)
            if self.waiting == i:
                self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            if self.waiting >= 0 and self.results[self.waiting] is not None:
                self.cond.notify()

    def take(self, i: int, deadline: Optional[float]) -> Any:
        from concurrent.futures import TimeoutError as FuturesTimeout

        with self.cond:
            while self.results[i] is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise FuturesTimeout()
                self.waiting = i
                self.cond.wait(left)
            self.waiting = -1
            ok, value = self.results[i]
            self.results[i] = (True, None)  # the iterator keeps no reference to what it yielded
        if not ok:
            raise value
        return value
