"""``GPUExecutor(cluster=...)``: the executor's engine on a Ray cluster (Note [Executor on a cluster]).

Note [Executor on a cluster]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The executor keeps its front (``GPUExecutor``: ``submit``, ``map``, ``shutdown``, the ``Future``
semantics, ``SerializationError`` at submit time, the report); ``RayEngine`` replaces the engine
(_executor_io.py) behind it. A worker is a Ray actor holding ``1 / slots_per_device`` of a GPU
(so ``slots_per_device`` workers share each GPU), pinned to its node: one per slot of every GPU of
every node with GPUs. Ray sets its CUDA_VISIBLE_DEVICES; ``worker_info().device`` is
``"<node>/cuda:<N>"``, N the node's GPU as Ray numbers it.

- The initializer runs once per actor, first; one that raises breaks the executor
  (``BrokenGPUExecutor``, its traceback as the cause), as locally.
- Calls wait in one queue at the caller; each actor has at most two in flight (one running, one
  waiting in its mailbox, so it never waits for a round trip), taken by the least busy actor first.
  A function is sent once per ``map``/function (``ray.put``) and kept by the actors that used it.
- Arguments and results travel as gpufleet pickles (Note [Callables by value]); their large buffers
  (NumPy arrays) go out of band through Ray's object store, and results come back writable (copied
  out of the store: what Ray's own ``ray.get`` gives is read-only).
- An exception comes back with the remote traceback and the node and device named in its notes.
- An actor that dies (its process killed, its node gone) fails the call it was running with
  ``WorkerDiedError``; the calls behind it go back to the front of the queue, and a new actor takes
  its place (on the same node if it is alive, anywhere else if not). Two deaths in a row before an
  actor is ready break the executor, as locally. Ray may hand over an actor's outcomes out of order
  (the death of its second call before the success of its first): a success completes its call
  wherever it stands; a failure counts as the actor's death only once every call before it has its
  outcome, so the call that was running when it died is the one that fails and none is left waiting.
  Ray sends a call's result after the call returns, from another thread of the actor's process: an
  actor that dies within a moment of finishing a call (the next call kills its process at once) may
  take that result with it, and Ray then fails the finished call too. The engine cannot tell it from
  the running one, so the earliest call without a result counts as the running one: it fails with
  ``WorkerDiedError`` (although it ran) and the calls behind it run again. Nothing waits for ever and
  each death fails one call.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

from .. import _serialize
from .._executor_calls import BrokenGPUExecutor, Call, WorkerDiedError
from . import _ray

DEPTH = 2  # calls in flight per actor
START_TIMEOUT = 120.0


class Worker:
    """The actor (wrapped with ``ray.remote`` by the engine): an initializer, then calls."""

    def __init__(self, index: int, slot: int, node_label: str) -> None:
        self.index, self.slot, self.node_label = index, slot, node_label
        self.fns: collections.OrderedDict = collections.OrderedDict()
        self.failed_init = False

    def hello(self) -> dict:
        """Where this actor runs (its first call: Ray placed it)."""
        import ray

        from .. import _executor

        gpu = ray.get_gpu_ids()
        device = f"{self.node_label}/cuda:{gpu[0]}" if gpu else f"{self.node_label}/cpu"
        _executor._set_worker_info({"rank": self.index, "device": device, "slot": self.slot})
        return {"device": device, "pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "node_id": ray.get_runtime_context().get_node_id()}

    def ready(self, init) -> tuple:
        """Runs the initializer: ("ready",) or ("init_error", pickled exception, traceback, summary)."""
        from .._executor_worker import _exc_payload

        if init is not None:
            try:
                fn, args, kwargs = _load(init)
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - breaks the executor, as ProcessPoolExecutor's does
                import logging

                logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
                self.failed_init = True
                return ("init_error",) + _exc_payload(e)
        return ("ready",)

    def call(self, fn_id: int, fn_box: list, args, chunked: bool) -> tuple:
        """One call (a chunk of ``map`` with ``chunked``): ("ok", result) or ("error", ...)."""
        import ray

        from .._executor_worker import _exc_payload

        try:
            fn = self.fns.get(fn_id)
            if fn is None:
                fn = self.fns[fn_id] = _load(ray.get(fn_box[0]))
                while len(self.fns) > 64:
                    self.fns.popitem(last=False)
            self.fns.move_to_end(fn_id)
            a = _load(args)
            if chunked:
                result = [fn(*x) for x in a]
            else:
                a, kw = a
                result = fn(*a, **kw)
            fn = a = None
            return ("ok", _serialize.dumps(result))
        except BaseException as e:  # noqa: BLE001 - goes back to the caller with its traceback
            return ("error",) + _exc_payload(e)


def _load(payload) -> Any:
    """A payload from Ray: its buffers copied out of Ray's (read-only) object store."""
    return _serialize.loads(payload.data, [bytearray(b) for b in payload.buffers])


class _Slot:
    """One worker place: (node, slot), the actor filling it now, its calls in flight."""

    def __init__(self, index: int, node: _ray.Node, name: str, slot: int):
        self.index, self.node, self.name, self.slot = index, node, name, slot
        self.actor: Any = None
        self.ready: Optional[Future] = None
        self.state = "down"  # starting, ready, stopping, down
        self.device = f"{name}/cuda:?"
        self.pid: Optional[int] = None
        self.visible = ""
        self.inflight: collections.deque = collections.deque()
        self.early: dict = {}  # id(call) -> how Ray failed it, while a call before it has no outcome yet
        self.false_starts = 0
        self.done = 0
        self.fn_ids: set = set()
        self.generation = 0  # which actor of this slot a callback is about
        self.placed = False  # its actor answered hello (Ray placed it)
        self.since = 0.0

    def where(self) -> str:
        return (f"gpufleet worker {self.index} on {self.device} (CUDA_VISIBLE_DEVICES={self.visible}, pid "
                f"{self.pid or '?'})")


class _ActorProcess:
    """What ``GPUExecutor._processes`` lists for an actor: its pid, and a way to stop it."""

    def __init__(self, engine: "RayEngine", slot: _Slot):
        self._engine, self._slot, self.pid = engine, slot, slot.pid

    def poll(self) -> Optional[int]:
        return None if self._slot.state in ("starting", "ready") and self._slot.pid == self.pid else 0

    def is_alive(self) -> bool:
        return self.poll() is None

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self._slot.pid == self.pid and self._slot.actor is not None:
            _ray.kill(self._engine.ray, self._slot.actor)

    def join(self, timeout: Optional[float] = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (end is None or time.monotonic() < end):
            time.sleep(0.01)

    wait = join


class RayEngine:
    """The engine interface GPUExecutor uses (check, put, shutdown, kill, processes, thread, slots,
    broken), on Ray actors (Note [Executor on a cluster])."""

    def __init__(self, cluster: Any, slots_per_device: int, *, init, max_tasks: Optional[int],
                 rebuild: Callable, record: Optional[Callable]):
        self.ray = _ray.connect(cluster, "GPUExecutor(cluster=...)")
        self.slots_per_device, self.max_tasks = slots_per_device, max_tasks
        self.rebuild, self.record = rebuild, record
        self.init = init
        self.lock = threading.RLock()  # the queue, the slots; never taken by Ray's own threads
        # Ray runs a future's callbacks on its own I/O thread, which must never wait for us (a user
        # thread holding self.lock may be waiting for Ray in a .remote()): they only append to
        # self.inbox and set this event; the engine thread does the rest
        self.wake = threading.Event()
        self.queue: collections.deque = collections.deque()
        self.shutting = self.killing = self.cancel_pending = False
        self.broken: Optional[BaseException] = None
        self.fn_refs: dict = {}  # Fn.key -> (id, [ObjectRef])
        self.next_fn = 1
        # what Ray's callbacks report, handled on the engine thread (no Ray call from Ray's own thread)
        self.inbox: collections.deque = collections.deque()
        self.cls = self.ray.remote(Worker)
        nodes = _ray.gpu_nodes(self.ray)
        if not nodes:
            raise RuntimeError("GPUExecutor(cluster=...): the Ray cluster has no node with GPUs")
        names = _node_names(self.ray, nodes)
        self.slots = [_Slot(0, n, names[n.node_id], s) for n in nodes for _ in range(n.gpus)
                      for s in range(slots_per_device)]
        for i, s in enumerate(self.slots):
            s.index = i
        for s in self.slots:
            self._start(s)
        self.thread = threading.Thread(target=self._run, name="gpufleet-ray-executor", daemon=True)
        self.thread.start()
        from .. import _executor_io

        _executor_io._live.add(self)  # interpreter exit: queued calls complete (_executor_io._at_exit)

    def pool(self) -> list:
        """The cluster's GPUs as the report names them, once every worker started (or failed to)."""
        from ._placement import ClusterDevice

        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end and any(s.state == "starting" for s in self.slots) and self.broken is None:
            time.sleep(0.01)
        seen = {}
        for s in self.slots:
            if s.device.rsplit(":", 1)[1].isdigit():
                seen.setdefault(s.device, ClusterDevice(s.name, int(s.device.rsplit(":", 1)[1]), "", s.visible, None))
        return sorted(seen.values(), key=lambda d: (d.node, d.ordinal))

    # ---- called from user threads -------------------------------------------------------------
    def check(self) -> None:
        from .. import _executor_io

        _executor_io.refuse_if_closed(self)

    def put(self, calls: list) -> None:
        with self.lock:
            self.check()
            self.queue.extend(calls)
            self._dispatch()

    def shutdown(self, cancel: bool) -> None:
        with self.lock:
            self.shutting = True
            if cancel:
                self._cancel_queued()
            self.wake.set()

    def kill(self) -> None:
        with self.lock:
            self.killing = True
            self.shutting = True
            self._cancel_queued()
            slots = list(self.slots)
        for s in slots:
            if s.actor is not None:
                _ray.kill(self.ray, s.actor)

    def processes(self) -> list:
        with self.lock:
            return [(s, _ActorProcess(self, s)) for s in self.slots if s.state in ("starting", "ready") and s.pid]

    # ---- actors ---------------------------------------------------------------------------------
    def _start(self, s: _Slot) -> None:
        alive = s.node.node_id in {n.node_id for n in _ray.gpu_nodes(self.ray)} if s.generation else True
        strategy = _ray.pinned(s.node.node_id) if alive else None  # a dead node's worker goes anywhere
        opts = {"num_gpus": 1.0 / self.slots_per_device, "num_cpus": 0, "max_restarts": 0, "max_concurrency": 1}
        if strategy is not None:
            opts["scheduling_strategy"] = strategy
        s.generation += 1
        s.actor = self.cls.options(**opts).remote(s.index, s.slot, s.name)
        s.state, s.done, s.pid, s.placed = "starting", 0, None, False
        s.fn_ids = set()
        s.since = time.monotonic()
        self._watch(s.actor.hello.remote(), s, "hello")
        self._watch(s.actor.ready.remote(self.init), s, None)

    def _watch(self, ref, s: _Slot, c: Optional[Call]) -> None:
        """Hands the outcome of ``ref`` (the slot's actor's ``ready``, or call ``c``) to the engine thread."""
        gen = s.generation

        def done(f: Future) -> None:
            self.inbox.append((s, gen, c, f))
            self.wake.set()

        ref.future().add_done_callback(done)

    def _run(self) -> None:
        """The engine thread: outcomes of Ray calls, then, once shut down and every call answered,
        the actors go."""
        from .. import _executor_io

        try:
            while True:
                self.wake.wait(0.5)
                self.wake.clear()
                with self.lock:
                    while self.inbox:
                        s, gen, c, f = self.inbox.popleft()
                        if gen == s.generation:
                            (self._ready if c is None else self._hello if c == "hello" else self._result)(s, c, f)
                    self._unplaced()
                    if (self.shutting or self.broken is not None) and not self.queue and not any(
                            s.inflight for s in self.slots):
                        break
            with self.lock:
                slots = list(self.slots)
                for s in slots:
                    s.generation += 1
                    s.state = "down"
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave futures hanging
            with self.lock:
                self._break(BrokenGPUExecutor(f"the executor's engine failed: {e!r}"))
                slots = list(self.slots)
        for s in slots:
            if s.actor is not None:
                _ray.kill(self.ray, s.actor)
                s.actor = None
        _executor_io._live.discard(self)

    def _hello(self, s: _Slot, c: str, f: Future) -> None:
        try:
            where = f.result()
        except BaseException:  # noqa: BLE001 - the actor died: its ready() says so
            return
        s.device, s.pid, s.visible, s.placed = where["device"], where["pid"], where["visible"], True

    def _unplaced(self) -> None:
        """An actor Ray cannot place (the cluster's GPUs held by other Ray work) breaks the executor
        after START_TIMEOUT, rather than leaving its calls waiting for ever."""
        now = time.monotonic()
        for s in self.slots:
            if s.state == "starting" and not s.placed and now - s.since > START_TIMEOUT:
                self._break(BrokenGPUExecutor(
                    f"gpufleet worker {s.index} (1/{self.slots_per_device} of a GPU on node {s.name}) was not placed "
                    f"by Ray within {START_TIMEOUT:g} s: are the cluster's GPUs held by other Ray work (another "
                    "executor, a cluster run)? ray.available_resources() shows what is free"))
                return

    def _ready(self, s: _Slot, c: None, f: Future) -> None:
        try:
            value = f.result()
        except BaseException as e:  # noqa: BLE001 - the actor could not start, or died starting
            self._lost(s, e)
            return
        if value[0] == "init_error":
            err = self.rebuild(value[1], value[2], value[3], f"the initializer of {s.where()}")
            broken = BrokenGPUExecutor(f"the initializer of {s.where()} raised {value[3]}; the executor is broken")
            broken.__cause__ = err
            self._break(broken)
            return
        s.state, s.false_starts = "ready", 0
        self._dispatch()

    def _dispatch(self) -> None:
        """Sends queued calls to the actors with room, the least busy first (lock held)."""
        if self.broken is not None or self.killing:
            return
        while self.queue:
            open_ = [s for s in self.slots if s.state in ("starting", "ready") and len(s.inflight) < DEPTH
                     and not (self.max_tasks and s.done + len(s.inflight) >= self.max_tasks)]
            if not open_:
                return
            s = min(open_, key=lambda s: (len(s.inflight), s.state != "ready"))
            c = self.queue.popleft()
            if not c.begin():
                continue
            self._send(s, c)
        self.wake.set()

    def _send(self, s: _Slot, c: Call) -> None:
        got = self.fn_refs.get(c.fn.key)
        if got is None:
            got = self.fn_refs[c.fn.key] = (self.next_fn, [self.ray.put(c.fn.payload)])
            self.next_fn += 1
        fn_id, box = got
        c.started = time.time()
        c.sent = True
        s.inflight.append(c)
        self._watch(s.actor.call.remote(fn_id, box, c.args, c.chunked), s, c)

    def _result(self, s: _Slot, c: Call, f: Future) -> None:
        if not any(x is c for x in s.inflight):
            return  # the actor was lost meanwhile: its calls were handled then
        try:
            value = f.result()
        except BaseException as e:  # noqa: BLE001 - the actor or its node died
            # the death, once the calls before this one have their outcomes (Note [Executor on a cluster])
            s.early[id(c)] = e
            self._settle(s)
            return
        s.inflight.remove(c)
        s.done += 1
        end = time.time()
        if value[0] == "ok":
            try:
                ok, result = True, _load(value[1])
            except BaseException as e:  # noqa: BLE001
                ok, result = False, BrokenGPUExecutor(f"the result of {c.name} from {s.where()} could not be "
                                                      f"unpickled here: {type(e).__name__}: {e}")
        else:
            ok, result = False, self.rebuild(value[1], value[2], value[3], s.where())
        if self.record is not None:
            self.record(c.name, s.device, s.slot, c.started, end, None if ok else result)
        c.finish(ok, result)
        if self.max_tasks and s.done >= self.max_tasks and not s.inflight:
            self._recycle(s)
        elif not self._settle(s):
            self._dispatch()

    def _settle(self, s: _Slot) -> bool:
        """A failure Ray reported for the first call still in flight is the actor's death (lock held)."""
        if s.inflight and id(s.inflight[0]) in s.early:
            self._lost(s, s.early[id(s.inflight[0])])
            return True
        return False

    def _recycle(self, s: _Slot) -> None:
        """``max_tasks_per_worker``: a fresh actor in its place (lock held)."""
        _ray.kill(self.ray, s.actor)
        s.generation += 1
        if not self.shutting or self.queue:
            self._start(s)
        else:
            s.state, s.actor = "down", None

    def _lost(self, s: _Slot, exc: BaseException) -> None:
        """The slot's actor is gone (lock held): WorkerDiedError for its running call, the others back
        in line, a new actor in its place."""
        was, where = s.state, s.where()
        why = _ray.reason(exc)
        s.generation += 1
        s.state, s.actor = "down", None
        if self.broken is not None:
            return
        if was == "starting":
            s.false_starts += 1
            if s.false_starts >= 2:
                self._break(BrokenGPUExecutor(f"{where} could not start ({why}), {s.false_starts} times in a row; "
                                              "the executor is broken"))
                return
        calls = list(s.inflight)
        s.inflight.clear()
        s.early.clear()
        if calls and self.killing:
            for c in calls:
                c.finish(False, WorkerDiedError(f"{where} was stopped while running a call, by the executor's kill "
                                                "sequence", s.device))
            calls = []
        if calls:
            first = calls.pop(0)
            err = WorkerDiedError(f"{where} died ({why}) while running a call; it was replaced", s.device)
            if self.record is not None:
                self.record(first.name, s.device, s.slot, first.started, time.time(), err)
            first.finish(False, err)
            self.queue.extendleft(reversed(calls))
        if not self.killing and (not self.shutting or self.queue):
            self._start(s)
        self._dispatch()

    def _break(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        failed = list(self.queue) + [c for s in self.slots for c in s.inflight]
        self.queue.clear()
        for s in self.slots:
            s.inflight.clear()
            s.early.clear()
            s.generation += 1
            if s.actor is not None:
                _ray.kill(self.ray, s.actor)
            s.state, s.actor = "down", None
        for c in failed:
            if c.sink is not None and c.begin():
                c.finish(False, exc)
        self.wake.set()

    def _cancel_queued(self) -> None:
        from .. import _executor_io

        dropped = list(self.queue)
        self.queue.clear()
        _executor_io.cancel_calls(dropped)


def _node_names(ray, nodes: list) -> dict:
    """node id -> its name in reports, as its own environment says (GPUFLEET_NODE_NAME, host name)."""
    fn = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(_ray.node_name)
    refs = [fn.options(scheduling_strategy=_ray.pinned(n.node_id)).remote() for n in nodes]
    got = ray.get(refs, timeout=START_TIMEOUT)
    names = _ray.unique_names(got, [n.node_id for n in nodes])
    return {n.node_id: name for n, name in zip(nodes, names)}
