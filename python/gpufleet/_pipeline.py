"""Pipelines: concurrent stages joined by bounded queues, with per-stage statistics.

The queues, the per-worker time accounting (busy / starved / blocked), the stage counters and the
sampling monitor are C++ (csrc/pipeline, ``gpufleet._core.pipeline``); blocking waits release the
GIL. This module wires stages into threads (and process pools), calls the user's functions, applies
the error policy, shuts everything down on Ctrl-C or a failing stage, and builds the report (its classes: _pipeline_report.py).

    report = (gpufleet.Pipeline(range(1000), ordered=True)
              .map(decode, workers=4)
              .batch(16, max_delay=0.05)
              .gpu(load_model)                 # load_model(device) -> fn(batch)
              .unbatch()
              .map(postprocess, workers=8)
              .sink(gpufleet.sinks.SqlSink("scores.db", "scores", key="id"))
              .run())
    print(report.summary())
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import heapq
import inspect
import math
import os
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Optional, Sequence

from . import _core, _progress
from ._pipeline_report import ItemError, PipelineReport, QueueReport, StageReport, _machine_cpu
from ._devices import Device, as_device, device_count, select_devices, topology

_pl = _core.pipeline
QueueClosed = _pl.QueueClosed
QueueCancelled = _pl.QueueCancelled

__all__ = ["Pipeline", "PipelineReport", "StageReport", "ItemError", "PipelineError"]

_ERROR_POLICIES = ("raise", "skip", "collect")
_SKIPPED = object()  # payload of a tombstone: an item that failed and was dropped (keeps `ordered` going)


class PipelineError(RuntimeError):
    """Raised by ``run()`` when a stage fails outside the user's functions (e.g. a sink's flush),
    or when a stage cannot start (a factory raised). ``report`` holds what was done until then."""

    def __init__(self, message: str, report: "PipelineReport | None" = None):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------------
# Stage specifications (built by the fluent API, instantiated by run()).


@dataclasses.dataclass
class _Spec:
    kind: str  # map, batch, gpu, unbatch, sink
    name: str
    fn: Any = None
    workers: int = 1
    processes: bool = False
    size: int = 0
    max_delay: Optional[float] = None
    collate: Optional[Callable] = None
    devices: Any = None
    replicas_per_device: int = 1
    factory: Optional[bool] = None
    to_device: bool = False
    queue_size: Optional[int] = None
    cluster: Optional[str] = None  # .gpu(cluster=...): replicas on a Ray cluster (gpufleet/cluster/_pipeline.py)


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_delay(value, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be None or a non-negative number of seconds, got {value!r}")
    return float(value)


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _is_factory(fn) -> bool:
    """Auto-detection for .gpu(): a callable whose first parameter is named ``device`` is a factory."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "device"


def _resolve_devices(devices) -> tuple[list[Device], str]:
    """Devices for a .gpu() stage and a note for the report."""
    if isinstance(devices, str) and devices == "auto":
        n = device_count()
        if n == 0:
            return [Device("cpu")], "no GPU visible: ran on the CPU"
        src = topology().source
        note = "simulated GPUs" if src == "simulated" else ""
        return [Device("cuda", i) for i in range(n)], note
    if isinstance(devices, bool):
        raise TypeError(f"devices must be 'auto', a count, a device or a list of devices, got {devices!r}")
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be 'auto', a count >= 1, a device or a list of devices, got {devices}")
        return select_devices(devices), ""
    if isinstance(devices, (str, Device)) or not isinstance(devices, Iterable):
        devices = [devices]
    out = [as_device(d) for d in devices]
    if not out:
        raise ValueError("devices is an empty list: give 'auto', a count, a device or a non-empty list")
    note = "ran on the CPU" if all(d.type == "cpu" for d in out) else ""
    return out, note


def _stager(device: Device) -> Callable[[Any], Any]:
    """Note [Staging batches]: with ``.gpu(..., to_device=True)`` each replica turns its batch into a
    gpufleet Tensor on its device before calling the user's function. For a CUDA device the batch is
    copied into a pinned host buffer owned by the replica (reallocated only when the batch's shape or
    dtype changes) and from there to the device; the host-to-device copy is synchronous, so the
    buffer is free for the next batch when it returns (still DMA from pinned memory, without a staging
    copy by the driver). For the CPU the batch is wrapped without a copy."""
    import numpy as np

    from . import _tensor as T

    state: dict = {"buf": None}

    def stage(batch):
        if isinstance(batch, T.Tensor):
            return batch.to(device)
        if not isinstance(batch, np.ndarray) and hasattr(batch, "__dlpack__"):
            return T.from_dlpack(batch, device=device)
        arr = np.ascontiguousarray(batch)
        if device.type == "cpu":
            return T.from_numpy(arr) if arr.flags.writeable else T.tensor(arr)
        buf = state["buf"]
        if buf is None or tuple(buf.shape) != arr.shape or buf.numpy().dtype != arr.dtype:
            buf = state["buf"] = T.empty(*arr.shape, dtype=str(arr.dtype), pin_memory=True)
        np.copyto(buf.numpy(), arr)
        return buf.to(device)

    return stage


def _split_batch(payload, n: int, stage: str) -> list:
    try:
        length = len(payload)
    except TypeError:
        raise TypeError(f"stage '{stage}': cannot unbatch a {type(payload).__name__}: expected a list, tuple "
                        f"or array whose first dimension is the batch") from None
    if length != n:
        raise ValueError(f"stage '{stage}': the batch holds {n} items but the stage's output has length "
                         f"{length}; a batch function must return one output per input")
    if isinstance(payload, (list, tuple)):
        return list(payload)
    return [payload[i] for i in range(n)]


class _Reorder:
    """Releases envelopes in source order (Note [Ordering]): an envelope whose smallest index is m
    goes out once every index below m has arrived (failed items arrive as tombstones)."""

    def __init__(self):
        self._heap: list = []
        self._arrived: set = set()
        self._prefix = 0  # every index < prefix has arrived
        self._tie = 0

    def push(self, env) -> list:
        keys = env[0]
        ks = keys if isinstance(keys, tuple) else (keys,)
        self._arrived.update(ks)
        while self._prefix in self._arrived:
            self._arrived.discard(self._prefix)
            self._prefix += 1
        if env[2] is not _SKIPPED:
            self._tie += 1
            heapq.heappush(self._heap, (min(ks) if ks else -1, self._tie, env))
        out = []
        while self._heap and self._heap[0][0] <= self._prefix:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def flush(self) -> list:
        out = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        return out


class _ListSink:
    def __init__(self):
        self.items: list = []

    def write(self, item):
        self.items.append(item)


class Pipeline:
    """A chain of concurrent stages fed from ``source`` (any iterable).

    ``ordered=True`` delivers results (and sink writes) in source order. ``on_error`` decides what a
    raising user function does: ``"raise"`` (default) stops the pipeline cleanly and re-raises the
    first error; ``"skip"`` records it (stage, index, id, error) and goes on; ``"collect"`` does the
    same and also keeps the failed input in ``ItemError.item``. ``id`` maps a source item to the id
    recorded with its errors. ``queue_size`` overrides every queue's default depth (about two batches
    per consumer worker). ``progress=True`` shows a bar of the items done and a line per stage with
    the limiting stage tagged (widgets in Jupyter, a bar in a terminal, a plain line every few seconds
    elsewhere: Note [Progress modes]). ``sample_interval`` is the monitor's period in seconds.
    """

    def __init__(self, source: Iterable, *, ordered: bool = False, on_error: str = "raise",
                 id: Optional[Callable[[Any], Any]] = None, queue_size: Optional[int] = None,
                 progress: bool = False, sample_interval: float = 0.05, name: str = "pipeline"):
        if not isinstance(source, Iterable):
            raise TypeError(f"source must be an iterable, got {type(source).__name__}")
        if on_error not in _ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {_ERROR_POLICIES}, got {on_error!r}")
        if id is not None and not callable(id):
            raise TypeError(f"id must be a callable mapping an item to its id, got {id!r}")
        if queue_size is not None:
            _check_int(queue_size, "queue_size")
        if isinstance(sample_interval, bool) or not isinstance(sample_interval, (int, float)) or not sample_interval > 0:
            raise ValueError(f"sample_interval must be a positive number of seconds, got {sample_interval!r}")
        self._source = source
        self._ordered = bool(ordered)
        self._on_error = on_error
        self._id = id
        self._queue_size = queue_size
        self._progress = bool(progress)
        self._sample_interval = float(sample_interval)
        self._name = name
        self._specs: list[_Spec] = []
        self._sink_spec: Optional[_Spec] = None

    # ---- building ---------------------------------------------------------------------------
    def _add(self, spec: _Spec) -> "Pipeline":
        if self._sink_spec is not None:
            raise ValueError(f"cannot add stage '{spec.name}' after .sink(): the sink ends the pipeline")
        names = {s.name for s in self._specs} | {"source"}
        base, i = spec.name, 2
        while spec.name in names:
            spec.name = f"{base}#{i}"
            i += 1
        if spec.queue_size is not None:
            _check_int(spec.queue_size, "queue_size")
        self._specs.append(spec)
        return self

    def _in_batches(self) -> bool:
        depth = 0
        for s in self._specs:
            depth += s.kind == "batch"
            depth -= s.kind == "unbatch"
        return depth > 0

    def map(self, fn: Callable[[Any], Any], *, workers: int = 1, processes: bool = False,
            name: Optional[str] = None, queue_size: Optional[int] = None) -> "Pipeline":
        """Applies ``fn`` to every item (to every batch after ``.batch()``) on ``workers`` threads, or
        with ``processes=True`` in ``workers`` fresh processes (use it for Python code that holds the
        GIL; ``fn`` may be a lambda, a closure or a function from ``__main__`` or a notebook: it travels
        by value, Note [Callables by value]; the items must pickle)."""
        if not callable(fn):
            raise TypeError(f"map() takes a callable, got {fn!r}")
        _check_int(workers, "workers")
        return self._add(_Spec("map", name or f"map:{_fn_name(fn)}", fn=fn, workers=workers,
                               processes=bool(processes), queue_size=queue_size))

    def batch(self, size: int, *, max_delay: Optional[float] = None, collate: Optional[Callable] = None,
              name: Optional[str] = None, queue_size: Optional[int] = None) -> "Pipeline":
        """Groups items into batches of ``size``; with ``max_delay`` (seconds) a partial batch goes out
        once its first item has waited that long. ``collate`` turns the list of items into the batch
        (e.g. ``numpy.stack``); by default the batch is the list."""
        _check_int(size, "size")
        if self._in_batches():
            raise ValueError("batch() after batch(): call unbatch() first")
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be a callable, got {collate!r}")
        return self._add(_Spec("batch", name or f"batch:{size}", size=size,
                               max_delay=_check_delay(max_delay, "max_delay"), collate=collate,
                               queue_size=queue_size))

    def gpu(self, fn_or_factory: Callable, *, devices: Any = "auto", replicas_per_device: int = 1,
            factory: Optional[bool] = None, to_device: bool = False, name: Optional[str] = None,
            queue_size: Optional[int] = None, cluster: Optional[str] = None) -> "Pipeline":
        """A device stage: one worker thread per replica per device. With a factory (a callable
        whose first parameter is named ``device``, or ``factory=True``) each replica calls
        ``factory(device)`` once, in its own thread, and uses the returned callable for every batch:
        a model is built once per replica. ``devices``: ``"auto"`` (every visible GPU; the CPU when
        there is none, noted in the report), a count (chosen by ``select_devices``), a device or a
        list. With ``to_device=True`` each batch (an array, a DLPack object or a gpufleet Tensor) reaches
        the function as a gpufleet Tensor on the replica's device, staged through a pinned host buffer
        per replica for a GPU (see Note [Staging batches]). Outputs pass through as returned (NumPy,
        torch, gpufleet or DLPack tensors). ``cluster`` (``"auto"``, ``"ray://head:10001"``,
        ``"head:6379"``; the ``ray`` extra) puts the replicas on every GPU of a Ray cluster as Ray actors
        (Note [Pipeline stages on a cluster] in gpufleet/cluster/_pipeline.py)."""
        if not callable(fn_or_factory):
            raise TypeError(f"gpu() takes a function or a factory, got {fn_or_factory!r}")
        _check_int(replicas_per_device, "replicas_per_device")
        is_factory = _is_factory(fn_or_factory) if factory is None else bool(factory)
        if cluster is not None:
            from .cluster import _pipeline as _on_ray  # Note [Optional extras]: ray is checked there first

            workers = _on_ray.plan(cluster, replicas_per_device, devices)
            return self._add(_Spec("gpu", name or f"gpu:{_fn_name(fn_or_factory)}", fn=fn_or_factory, workers=workers,
                                   devices=([], ""), replicas_per_device=replicas_per_device, factory=is_factory,
                                   to_device=bool(to_device), queue_size=queue_size, cluster=cluster))
        devs, note = _resolve_devices(devices)
        return self._add(_Spec("gpu", name or f"gpu:{_fn_name(fn_or_factory)}", fn=fn_or_factory,
                               workers=len(devs) * replicas_per_device, devices=(devs, note),
                               replicas_per_device=replicas_per_device, factory=is_factory,
                               to_device=bool(to_device), queue_size=queue_size))

    def unbatch(self, *, name: Optional[str] = None, queue_size: Optional[int] = None) -> "Pipeline":
        """Splits each batch output back into items (its length must equal the batch's)."""
        if not self._in_batches():
            raise ValueError("unbatch() without a batch() before it")
        return self._add(_Spec("unbatch", name or "unbatch", queue_size=queue_size))

    def sink(self, target: Any, *, name: Optional[str] = None, queue_size: Optional[int] = None) -> "Pipeline":
        """Ends the pipeline: ``target`` is a callable called with every item, or an object with
        ``write(item)`` and optionally ``open()``, ``poll()`` (called when idle for ``max_delay``),
        ``close()`` (such as ``gpufleet.sinks.SqlSink``). One thread writes, so the target needs no
        locking."""
        if not (callable(target) or hasattr(target, "write")):
            raise TypeError(f"sink() takes a callable or an object with write(), got {target!r}")
        spec = _Spec("sink", name or f"sink:{_fn_name(target)}", fn=target, queue_size=queue_size)
        self._add(spec)
        self._specs.pop()
        self._sink_spec = spec
        return self

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> PipelineReport:
        """Runs the pipeline to the end and returns its report. Ctrl-C or a failing stage (with
        ``on_error="raise"``) stops every stage: queues are cancelled, every thread joined, process
        pools shut down, and the sink closed (it commits what it holds); then the exception is
        re-raised with the partial report as ``exc.pipeline_report``."""
        return _Run(self).execute()

    def __repr__(self) -> str:
        chain = " -> ".join(["source"] + [s.name for s in self._specs] +
                            ([self._sink_spec.name] if self._sink_spec else []))
        return f"Pipeline({chain})"


def _default_capacity(spec: _Spec) -> int:
    if spec.kind == "batch":
        return 2 * spec.size
    return max(4, 2 * spec.workers)


class _Stage:
    def __init__(self, spec: _Spec, stats, in_q, out_q):
        self.spec = spec
        self.stats = stats
        self.in_q = in_q
        self.out_q = out_q
        self.pool = None  # a GPUExecutor(devices="cpu") for map(processes=True); (cluster=...) for gpu(cluster=...)
        self.fn_ref = None  # its function, pickled once
        self.cluster_devices = None  # gpu(cluster=...): (its replicas by node and device, a note) for the report


class _Run:
    """One execution of a Pipeline."""

    def __init__(self, p: Pipeline):
        self.p = p
        self.errors: list[ItemError] = []
        self.errors_lock = threading.Lock()
        self.failure: Optional[BaseException] = None
        self.failure_lock = threading.Lock()
        self.cancelled = threading.Event()
        self.queues: list = []
        self.queue_names: list[str] = []
        self.stages: list[_Stage] = []
        self.threads: list[threading.Thread] = []
        self.gpu_samples: list[dict] = []

    # ---- building -------------------------------------------------------------------------------
    def _queue(self, consumer: _Spec, name: str):
        cap = consumer.queue_size or self.p._queue_size or _default_capacity(consumer)
        q = _pl.Queue(cap)
        self.queues.append(q)
        self.queue_names.append(name)
        return q

    def build(self):
        specs = list(self.p._specs)
        sink = self.p._sink_spec or _Spec("sink", "results", fn=_ListSink())
        chain = specs + [sink]
        src_stats = _pl.StageStats("source", 1)
        first_q = self._queue(chain[0], f"source->{chain[0].name}")
        first_q.set_producers(1)
        self.source_stage = _Stage(_Spec("source", "source"), src_stats, None, first_q)
        in_q = first_q
        for i, spec in enumerate(chain):
            stats = _pl.StageStats(spec.name, spec.workers)
            if i + 1 < len(chain):
                out_q = self._queue(chain[i + 1], f"{spec.name}->{chain[i + 1].name}")
                out_q.set_producers(spec.workers)
            else:
                out_q = None
            self.stages.append(_Stage(spec, stats, in_q, out_q))
            in_q = out_q
        self.sink_stage = self.stages[-1]
        self.internal_sink = self.p._sink_spec is None

    # ---- failure handling ---------------------------------------------------------------------
    def cancel(self):
        self.cancelled.set()
        for q in self.queues:
            q.cancel()

    def fail(self, exc: BaseException, where: str):
        with self.failure_lock:
            if self.failure is None:
                self.failure = exc
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(in gpufleet pipeline stage {where})")
        self.cancel()

    def item_error(self, stage: _Stage, env, exc: BaseException) -> None:
        """Applies the error policy to a failed envelope (one record per item it holds)."""
        keys, ids, payload = env
        ks = keys if isinstance(keys, tuple) else (keys,)
        idl = ids if isinstance(keys, tuple) else (ids,)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        stage.stats.add_errors(len(ks))
        with self.errors_lock:
            for k, i in zip(ks, idl):
                self.errors.append(ItemError(stage.spec.name, k, i, exc, tb,
                                             payload if self.p._on_error == "collect" else None))
        if self.p._on_error == "raise":
            self.fail(exc, f"'{stage.spec.name}' on item {idl[0]!r} (#{ks[0]})")

    # ---- workers --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self, stage: _Stage, w: int = 0):
        """The life of a worker between two queues: its clock runs for the whole body; a cancelled
        queue ends it quietly, any other exception fails the run naming the stage; either way the
        clock stops and the downstream queue learns this producer is done."""
        clock = stage.stats.clock(w)
        clock.start()
        try:
            yield clock
        except QueueCancelled:
            pass
        except BaseException as e:
            self.fail(e, f"'{stage.spec.name}'")
        finally:
            clock.finish()
            stage.out_q.producer_done()
    def _source_worker(self):
        st = self.source_stage
        clock = st.stats.clock(0)
        clock.start()
        it = None
        try:
            it = iter(self.p._source)
            idf = self.p._id
            seq = 0
            for item in it:
                st.stats.add_items_in(1)
                try:
                    ident = idf(item) if idf is not None else seq
                except Exception as e:  # the id function failed: an error of this item
                    self.item_error(st, (seq, seq, item), e)
                    if self.cancelled.is_set():
                        break
                    st.out_q.put((seq, seq, _SKIPPED), clock)
                    seq += 1
                    continue
                st.out_q.put((seq, ident, item), clock)
                st.stats.add_items_out(1)
                seq += 1
                if self.cancelled.is_set():
                    break
        except QueueCancelled:
            pass
        except BaseException as e:  # the source iterable raised: the run fails
            self.fail(e, "source")
        finally:
            if it is not None and hasattr(it, "close"):
                try:
                    it.close()
                except Exception:
                    pass
            clock.finish()
            st.out_q.producer_done()

    def _stage_worker(self, stage: _Stage, w: int, fn: Optional[Callable]):
        spec, stats, in_q, out_q = stage.spec, stage.stats, stage.in_q, stage.out_q
        with self._running(stage, w) as clock:
            if spec.kind == "gpu" and spec.factory:
                dev = stage.devices[w // spec.replicas_per_device]
                try:
                    fn = spec.fn(dev)
                except BaseException as e:
                    self.fail(e, f"'{spec.name}' (factory for {dev})")
                    return
                if not callable(fn):
                    self.fail(TypeError(f"the factory of stage '{spec.name}' returned {fn!r} for {dev}, "
                                        f"expected a callable"), spec.name)
                    return
            if spec.kind == "gpu" and spec.to_device:
                stage_in, user_fn = _stager(stage.devices[w // spec.replicas_per_device]), fn
                fn = lambda batch: user_fn(stage_in(batch))  # noqa: E731
            while True:
                try:
                    env = in_q.get(clock)
                except QueueClosed:
                    break
                keys, ids, payload = env
                n = len(keys) if isinstance(keys, tuple) else 1
                stats.add_items_in(n)
                if payload is _SKIPPED:
                    out_q.put(env, clock)
                    continue
                try:
                    result = fn(payload)
                except Exception as e:
                    if not self._skip_failed(stage, env, e, clock):
                        break
                    continue
                if isinstance(keys, tuple):
                    stats.add_batch(n)
                stats.add_items_out(n)
                out_q.put((keys, ids, result), clock)

    def _skip_failed(self, stage: _Stage, env, exc: BaseException, clock) -> bool:
        """A call of a stage failed: the error policy, then a skip marker downstream; False when
        the run is cancelled (the worker stops)."""
        self.item_error(stage, env, exc)
        if self.cancelled.is_set():
            return False
        stage.out_q.put((env[0], env[1], _SKIPPED), clock)
        return True

    def _process_worker(self, stage: _Stage, w: int):
        """``map(processes=True)``: like ``_stage_worker``, but the calls run in the stage's
        executor, two in flight per thread so its worker process never waits on this thread between
        items (Note [Calls in flight] in _executor_io.py); items leave in the order they came."""
        stats, in_q, out_q, pool = stage.stats, stage.in_q, stage.out_q, stage.pool
        with self._running(stage, w) as clock:
            pending: collections.deque = collections.deque()
            closed = False
            while pending or not closed:
                while not closed and len(pending) < 2:
                    try:
                        env = in_q.get(clock, 0 if pending else None)
                    except TimeoutError:
                        break
                    except QueueClosed:
                        closed = True
                        break
                    keys, ids, payload = env
                    stats.add_items_in(len(keys) if isinstance(keys, tuple) else 1)
                    fut = None
                    if payload is not _SKIPPED:
                        try:
                            fut = pool._submit_with(stage.fn_ref, payload)
                        except Exception as e:  # an item that cannot be pickled: that item's error
                            fut = concurrent.futures.Future()
                            fut.set_exception(e)
                    pending.append((env, fut))
                if not pending:
                    continue
                env, fut = pending.popleft()
                keys, ids, _ = env
                if fut is None:
                    out_q.put(env, clock)
                    continue
                try:
                    result = fut.result()
                except Exception as e:
                    if not self._skip_failed(stage, env, e, clock):
                        break
                    continue
                n = len(keys) if isinstance(keys, tuple) else 1
                if isinstance(keys, tuple):
                    stats.add_batch(n)
                stats.add_items_out(n)
                out_q.put((keys, ids, result), clock)
                del result, fut

    def _batch_worker(self, stage: _Stage):
        spec, stats, in_q, out_q = stage.spec, stage.stats, stage.in_q, stage.out_q
        with self._running(stage) as clock:
            size, delay, collate = spec.size, spec.max_delay, spec.collate

            def emit(buf):
                keys = tuple(e[0] for e in buf)
                ids = tuple(e[1] for e in buf)
                items = [e[2] for e in buf]
                try:
                    payload = collate(items) if collate is not None else items
                except Exception as e:
                    self.item_error(stage, (keys, ids, items), e)
                    if not self.cancelled.is_set():
                        out_q.put((keys, ids, _SKIPPED), clock)
                    return
                stats.add_batch(len(buf))
                stats.add_items_out(len(buf))
                out_q.put((keys, ids, payload), clock)

            buf: list = []
            deadline = None
            while True:
                timeout = None
                if buf and delay is not None:
                    timeout = max(0.0, deadline - time.monotonic())
                try:
                    env = in_q.get(clock, timeout)
                except TimeoutError:
                    emit(buf)
                    buf = []
                    continue
                except QueueClosed:
                    break
                stats.add_items_in(1)
                if env[2] is _SKIPPED:
                    out_q.put(env, clock)
                    continue
                if not buf and delay is not None:
                    deadline = time.monotonic() + delay
                buf.append(env)
                if len(buf) >= size:
                    emit(buf)
                    buf = []
            if buf:
                emit(buf)

    def _unbatch_worker(self, stage: _Stage):
        spec, stats, in_q, out_q = stage.spec, stage.stats, stage.in_q, stage.out_q
        with self._running(stage) as clock:
            while True:
                try:
                    keys, ids, payload = in_q.get(clock)
                except QueueClosed:
                    break
                if not isinstance(keys, tuple):  # a single failed item that skipped the batch stage
                    stats.add_items_in(1)
                    out_q.put((keys, ids, payload), clock)
                    continue
                stats.add_items_in(len(keys))
                if payload is _SKIPPED:
                    for k, i in zip(keys, ids):
                        out_q.put((k, i, _SKIPPED), clock)
                    continue
                try:
                    parts = _split_batch(payload, len(keys), spec.name)
                except Exception as e:
                    self.item_error(stage, (keys, ids, payload), e)
                    if self.cancelled.is_set():
                        break
                    for k, i in zip(keys, ids):
                        out_q.put((k, i, _SKIPPED), clock)
                    continue
                stats.add_batch(len(keys))
                for k, i, part in zip(keys, ids, parts):
                    out_q.put((k, i, part), clock)
                    stats.add_items_out(1)

    def _sink_worker(self, stage: _Stage):
        spec, stats, in_q = stage.spec, stage.stats, stage.in_q
        target = spec.fn
        write = target.write if hasattr(target, "write") else target
        poll = getattr(target, "poll", None)
        poll_every = getattr(target, "max_delay", None) if poll is not None else None
        reorder = _Reorder() if self.p._ordered else None
        clock = stats.clock(0)
        clock.start()
        opened = False

        def deliver(env):
            keys, ids, payload = env
            n = len(keys) if isinstance(keys, tuple) else 1
            try:
                write(payload)
            except Exception as e:
                self.item_error(stage, env, e)
                return
            stats.add_items_out(n)

        try:
            if hasattr(target, "open"):
                target.open()
            opened = True
            while True:
                try:
                    env = in_q.get(clock, poll_every)
                except TimeoutError:
                    poll()
                    continue
                except QueueClosed:
                    break
                keys = env[0]
                stats.add_items_in(len(keys) if isinstance(keys, tuple) else 1)
                if reorder is not None:
                    for e in reorder.push(env):
                        deliver(e)
                elif env[2] is not _SKIPPED:
                    deliver(env)
            if reorder is not None and not self.cancelled.is_set():
                for e in reorder.flush():
                    deliver(e)
        except QueueCancelled:
            pass
        except BaseException as e:
            self.fail(e, f"'{spec.name}'")
        finally:
            # Close even when cancelled: a sink commits what it already holds (no lost result).
            try:
                if opened and hasattr(target, "close"):
                    target.close()
            except BaseException as e:
                self.fail(e, f"'{spec.name}' (close)")
            clock.finish()

    # ---- monitoring -------------------------------------------------------------------------------
    def _gpu_sampler(self, devices: list[Device], stop: threading.Event, t0: float):
        idx = sorted({d.index for d in devices if d.type == "cuda" and d.index is not None})
        while True:
            try:
                infos = {i.ordinal: i for i in topology().gpus if getattr(i, "ordinal", None) in idx}
                src = topology().source
            except Exception:  # monitoring must never break a run
                infos, src = {}, "unavailable"
            now = time.monotonic() - t0
            for i in idx:
                info = infos.get(i)
                self.gpu_samples.append({
                    "t_s": now, "device": f"cuda:{i}", "source": src,
                    "utilization": getattr(info, "utilization", None) if info else None,
                    "used_memory": getattr(info, "used_memory", None) if info else None,
                })
            if stop.wait(0.5):
                return

    def _show_progress(self, stop: threading.Event):
        """One bar (items through the sink, of the source's length when it has one) and a line per
        stage (items out, busy %, input queue, the limiting stage tagged), in the mode the output
        allows (Note [Progress modes]: widgets, terminal bars, or a plain block every few seconds)."""
        shown = [self.source_stage] + [s for s in self.stages if not (self.internal_sink and s is self.sink_stage)]
        try:
            total: Optional[int] = len(self.p._source)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = _progress.Bar(total=total, desc=self.p._name, unit="item", status_lines=len(shown))
        try:
            while True:
                done = stop.wait(0.2)
                utils = [s.stats.utilization() for s in shown]
                lim = max(range(len(utils)), key=lambda i: utils[i])
                for i, s in enumerate(shown):
                    tag = " [limiting]" if i == lim and utils[i] > 0 else ""
                    q = f", queue {len(s.in_q)}/{s.in_q.capacity}" if s.in_q is not None else ""
                    bar.set_line(i, f"{s.spec.name}{tag}: {s.stats.items_out} out, busy {100 * utils[i]:.0f}%{q}")
                if utils[lim] > 0:
                    bar.set_postfix_str(f"limiting: {shown[lim].spec.name} (busy {100 * utils[lim]:.0f}%)",
                                        refresh=False)
                bar.n = self.sink_stage.stats.items_in
                bar.refresh()
                if done:
                    return
        finally:
            bar.close()

    # ---- the run ----------------------------------------------------------------------------------
    def execute(self) -> PipelineReport:
        self.build()
        monitor = _pl.Monitor(self.p._sample_interval)
        for name, q in zip(self.queue_names, self.queues):
            monitor.add_queue(name, q)
        all_stages = [self.source_stage] + self.stages
        for s in all_stages:
            monitor.add_stage(s.stats)
        gpu_devices: list[Device] = []
        t0_ns = _pl.now_ns()
        t0 = time.monotonic()
        self.cpu0 = time.process_time()
        self.machine0 = _machine_cpu()
        status = "completed"
        stop_aux = threading.Event()
        aux: list[threading.Thread] = []
        try:
            # Process pools and devices first: a failure here starts nothing.
            for s in self.stages:
                if s.spec.kind == "map" and s.spec.processes:
                    # fresh processes in their own process group (a terminal's Ctrl-C reaches
                    # only the parent, which owns shutdown); fn and items travel by value where
                    # needed (Note [Callables by value] in _serialize.py)
                    from ._executor import GPUExecutor

                    s.pool = GPUExecutor(devices="cpu", workers=s.spec.workers)
                    s.fn_ref = s.pool._prepare(s.spec.fn)  # pickled once for the run
                if s.spec.kind == "gpu" and s.spec.cluster is not None:
                    from .cluster import _pipeline as _on_ray

                    s.pool, s.fn_ref = _on_ray.start(s.spec.cluster, s.spec.replicas_per_device, s.spec.fn,
                                                     bool(s.spec.factory), s.spec.to_device)
                elif s.spec.kind == "gpu":
                    s.devices = s.spec.devices[0]  # worker w runs on devices[w // replicas_per_device]
                    gpu_devices += [d for d in s.spec.devices[0] if d.type == "cuda"]
            monitor.start()
            self.threads.append(threading.Thread(target=self._source_worker, name="gf-source", daemon=True))
            for s in self.stages:
                k = s.spec.kind
                if s.pool is not None:
                    for w in range(s.spec.workers):
                        self.threads.append(threading.Thread(target=self._process_worker, args=(s, w),
                                                             name=f"gf-{s.spec.name}-{w}", daemon=True))
                elif k in ("map", "gpu"):
                    fn = None if (k == "gpu" and s.spec.factory) else s.spec.fn
                    for w in range(s.spec.workers):
                        self.threads.append(threading.Thread(target=self._stage_worker, args=(s, w, fn),
                                                             name=f"gf-{s.spec.name}-{w}", daemon=True))
                elif k == "batch":
                    self.threads.append(threading.Thread(target=self._batch_worker, args=(s,), daemon=True,
                                                         name=f"gf-{s.spec.name}"))
                elif k == "unbatch":
                    self.threads.append(threading.Thread(target=self._unbatch_worker, args=(s,), daemon=True,
                                                         name=f"gf-{s.spec.name}"))
                else:
                    self.threads.append(threading.Thread(target=self._sink_worker, args=(s,), daemon=True,
                                                         name=f"gf-{s.spec.name}"))
            if gpu_devices and topology().source not in ("none",):
                aux.append(threading.Thread(target=self._gpu_sampler, args=(gpu_devices, stop_aux, t0),
                                            daemon=True, name="gf-gpu-sampler"))
            if self.p._progress:
                aux.append(threading.Thread(target=self._show_progress, args=(stop_aux,), daemon=True,
                                            name="gf-progress"))
            for t in aux + self.threads:
                t.start()
            self._join_all()
        except BaseException as e:  # KeyboardInterrupt in the main thread, or a startup failure
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            self.cancel()
            self._join_all(final=True)
            self._shutdown_pools()
            monitor.stop()
            stop_aux.set()
            for t in aux:
                t.join()
            report = self._report(monitor, t0_ns, t0, status)
            if self.failure is None or isinstance(e, KeyboardInterrupt):
                e.pipeline_report = report
                raise
            self.failure.pipeline_report = report
            raise self.failure from None
        self._shutdown_pools()
        monitor.stop()
        stop_aux.set()
        for t in aux:
            t.join()
        if self.failure is not None:
            report = self._report(monitor, t0_ns, t0, "failed")
            exc = self.failure
            exc.pipeline_report = report
            raise exc
        return self._report(monitor, t0_ns, t0, status)

    def _join_all(self, final: bool = False):
        # Join with a timeout so Ctrl-C reaches the main thread while the workers run.
        for t in self.threads:
            while t.is_alive():
                t.join(0.1 if not final else 0.5)

    def _shutdown_pools(self):
        for s in self.stages:
            if s.pool is not None:
                if s.spec.kind == "gpu":  # a cluster stage: its replicas by node and device, for the report
                    from .cluster import _pipeline as _on_ray

                    s.cluster_devices = _on_ray.describe(s.pool)
                s.pool.shutdown(wait=True, cancel_futures=True)
                s.pool = None

    def _report(self, monitor, t0_ns: int, t0: float, status: str) -> PipelineReport:
        wall = time.monotonic() - t0
        cpu = time.process_time() - self.cpu0  # every thread of this process; process pools' children not
        m0, m1 = self.machine0, _machine_cpu()
        machine_busy = None
        if m0 is not None and m1 is not None and m1[0] > m0[0]:
            machine_busy = 1.0 - (m1[1] - m0[1]) / (m1[0] - m0[0])
        all_stages = [self.source_stage] + self.stages
        visible = [s for s in all_stages if not (self.internal_sink and s is self.sink_stage)]
        reports = []
        for s in visible:
            tot = s.stats.totals()
            workers = [s.stats.clock(w).totals() for w in range(s.stats.workers)]
            devs, note = ([], "")
            if s.spec.kind == "gpu":
                devs, note = s.cluster_devices or (list(s.spec.devices[0]), s.spec.devices[1])
            if s.spec.kind == "map" and s.spec.processes:
                note = f"{s.spec.workers} spawned processes"
            reports.append(StageReport(
                name=s.spec.name, kind=s.spec.kind, workers=s.stats.workers, items_in=s.stats.items_in,
                items_out=s.stats.items_out, batches=s.stats.batches, mean_batch_size=s.stats.mean_batch_size,
                busy_s=tot["busy_s"], starved_s=tot["starved_s"], blocked_s=tot["blocked_s"],
                wall_s=sum(w["wall_s"] for w in workers), utilization=s.stats.utilization(),
                errors=s.stats.errors, devices=devs, note=note, workers_detail=workers))
        lim = _pl.limiting_stage([s.stats for s in visible])
        times, rows = monitor.samples()
        names = monitor.names
        cols = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        timeline = {
            "t_s": times,
            "offset_us": (monitor.start_ns - t0_ns) / 1e3,
            "queues": {n: cols[n] for n in self.queue_names},
            "items_out": {s.spec.name: cols[s.spec.name + ".items_out"] for s in visible},
            "busy_s": {s.spec.name: cols[s.spec.name + ".busy_s"] for s in visible},
        }
        queues = [QueueReport(n, q.capacity, q.high_water, q.total_put) for n, q in zip(self.queue_names, self.queues)]
        results = None
        if self.internal_sink:
            results = [item for item in self.sink_stage.spec.fn.items]
        return PipelineReport(stages=reports, queues=queues, wall_s=wall,
                              limiting_stage=visible[lim].spec.name if lim >= 0 else None,
                              errors=sorted(self.errors, key=lambda e: e.index), results=results,
                              timeline=timeline, gpu_samples=list(self.gpu_samples), status=status,
                              trace_stats=[s.stats for s in visible], t0_ns=t0_ns, cpu_s=cpu,
                              machine_busy=machine_busy,
                              cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else (os.cpu_count() or 1))
