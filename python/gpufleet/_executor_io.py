"""The engine behind ``GPUExecutor``: one thread that owns the worker processes, sends them calls
and reads their results.

Note [Calls in flight]
~~~~~~~~~~~~~~~~~~~~~~
Calls wait in one queue; each worker is sent calls ahead of time, so it starts the next call the
moment it sends a result instead of idling while the parent handles it. How many: at least 2 (one
running, one waiting in its socket) and as many as make about 10 ms of work by the worker's measured
time per call (up to 256 for tiny calls), so a slow call holds back little on its worker (calls are
not stolen back) while a map over tiny items goes in large batches; a burst is shared among the
workers (none takes more than its share of the queue). The frames for one worker go out in one
write; the worker writes the results of a function that has been taking under 0.5 ms together while
more calls of it are waiting (_executor_worker.py, ``_hold``), and the parent reads as many as have
arrived at once. A function is pickled once per ``map`` (per ``submit``, again only when what it
depends on changed) and sent once per worker, which keeps it by id (``fn`` frames, evicted least
recently used); the calls carry only their arguments.

One thread serves every worker with ``epoll``: each worker's socket (non-blocking: a busy worker
never stalls the others), a pidfd per worker process (a worker is dead when its process ends, even
if a child it forked still holds its socket), and an eventfd. A ``submit`` while the engine sleeps
with a worker free sends the call from the caller's thread (``io`` lock), which saves waking the
engine; otherwise it wakes the engine. The thread holds no reference to the ``GPUExecutor``, so an
executor dropped without ``shutdown()`` is collected and its engine finishes the queued calls and
stops, as ``ProcessPoolExecutor`` does.

A worker that dies fails the call it was running with ``WorkerDiedError`` (a ``BrokenProcessPool``)
naming the device; the calls queued behind it on that worker never started and go back to the front
of the queue; the worker is replaced. A worker whose initializer raises breaks the executor, as
``ProcessPoolExecutor`` does, and so does a worker that dies twice in a row before it is ready (an
initializer that crashes, an interpreter that cannot start): every queued call and every later
``submit`` fail with ``BrokenGPUExecutor``.
"""
from __future__ import annotations

import collections
import os
import select
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional

from . import _ipc
from ._executor_calls import BrokenGPUExecutor, Call, WorkerDiedError
from ._spawn import Supervised, describe_exit, start_worker, stop_group

DEPTH = 2  # calls in flight per worker at least ...
MAX_DEPTH = 256  # ... and at most, when calls are short
_WORK_AHEAD = 0.01  # seconds of (estimated) work in flight per worker
_FN_CACHE = 64  # functions a worker keeps
_FN_CACHE_BYTES = 64 << 20


class _Slot:
    """One worker place (device, slot) and the process that fills it now."""

    def __init__(self, index: int, device: str, visible: str, slot: int):
        self.index, self.device, self.visible, self.slot = index, device, visible, slot
        self.proc = self.chan = None
        self.pidfd = -1
        self.state = "down"  # down, starting, ready, stopping
        self.inflight: collections.deque = collections.deque()
        self.fn_ids: collections.OrderedDict = collections.OrderedDict()
        self.fn_bytes = 0
        self.sent = self.done = 0
        self.deadline = None
        self.kill_stage = 0
        self.last_end = 0.0
        self.svc = None  # seconds per call, moving average (None: not known yet)
        self.false_starts = 0  # deaths before "ready" in a row
        self.depth = DEPTH

    def where(self) -> str:
        pid = self.proc.pid if self.proc else "?"
        return f"gpufleet worker {self.index} on {self.device} (CUDA_VISIBLE_DEVICES={self.visible}, pid {pid})"

    def capacity(self, max_tasks: Optional[int]) -> int:
        if self.state not in ("starting", "ready"):  # calls wait in a starting worker's socket
            return 0
        room = self.depth - len(self.inflight)
        if max_tasks:
            room = min(room, max_tasks - self.sent)
        return room


class Engine:
    def __init__(self, places: list, *, init: Optional[tuple], grace: float, max_tasks: Optional[int],
                 rebuild: Callable, prep: Callable, record: Optional[Callable]):
        self.slots = [_Slot(i, d, v, s) for i, (d, v, s) in enumerate(places)]
        self.init_payload, self.init_fds, self.init_keep = init if init is not None else (None, (), None)
        self.grace, self.max_tasks = grace, max_tasks
        self.rebuild, self.prep, self.record = rebuild, prep, record
        self.sup = Supervised(grace)
        self.lock = threading.Lock()  # the queue and the flags
        self.io = threading.Lock()  # the slots, their channels and processes
        self.closing = False
        self.queue: collections.deque = collections.deque()
        self.shutting = self.killing = self.cancel_pending = False
        self.broken: Optional[BaseException] = None
        self.want_work = False
        self.woken = False
        self.next_id = 1
        self.fn_keys: collections.OrderedDict = collections.OrderedDict()
        self.next_fn = 1
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wake_fd, select.EPOLLIN)
        self.by_fd: dict[int, tuple[_Slot, str]] = {}
        self.closed_fds: set = set()
        for s in self.slots:
            self._start(s)  # eagerly: initializers run while the first calls are submitted
        self.thread = threading.Thread(target=self._run, name="gpufleet-executor", daemon=True)
        _live.add(self)
        self.thread.start()

    # ---- called from user threads -------------------------------------------------------------
    def check(self) -> None:
        refuse_if_closed(self)

    def put(self, calls: list) -> None:
        with self.lock:
            self.check()
            self.queue.extend(calls)
            idle = self.want_work
        if idle:
            # The engine sleeps with a worker free: hand the calls over from this thread (one thread
            # switch less per call); the engine reads the results. If it is busy, it is woken.
            if self.io.acquire(blocking=False):
                try:
                    self._dispatch()
                finally:
                    self.io.release()
            else:
                with self.lock:
                    if not self.woken and self.wake_fd >= 0:
                        self.woken = True
                        os.eventfd_write(self.wake_fd, 1)

    def shutdown(self, cancel: bool) -> None:
        """No new calls; with ``cancel``, the engine cancels what it could not start (it first
        fills the workers it can, as ProcessPoolExecutor's calls in its call queue run)."""
        with self.lock:
            self.shutting = True
            self.cancel_pending |= cancel
            if not self.woken and self.wake_fd >= 0:
                self.woken = True
                os.eventfd_write(self.wake_fd, 1)
        if cancel and not self.thread.is_alive():
            self._cancel_queued()

    def _cancel_queued(self) -> None:
        with self.lock:
            dropped = list(self.queue)
            self.queue.clear()
        cancel_calls(dropped)

    def kill(self) -> None:
        """The kill sequence on every worker now (Ctrl-C, interpreter exit interrupted): queued calls
        are cancelled, running ones fail with WorkerDiedError, nothing is restarted."""
        self.killing = True
        self.shutdown(cancel=True)
        stop_group([s.proc for s in self.slots if s.proc is not None], self.grace)

    def processes(self) -> list:
        return [(s, s.proc) for s in self.slots if s.proc is not None and s.state != "down"]

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.io:  # Note [Calls in flight]: the slots are this lock's (put may dispatch)
                    self._dispatch()
                    if self.cancel_pending:
                        self._cancel_queued()
                    if self._finished():
                        return
                    timeout = self._deadlines()
                with self.lock:
                    self.woken = False
                    free = any(s.capacity(self.max_tasks) > 0 for s in self.slots)
                    self.want_work = free and not self.queue
                    if self.queue and free:
                        timeout = 0
                events = self.ep.poll(timeout)
                self.want_work = False
                with self.io:
                    self._events(events)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave futures hanging forever
            with self.io:
                self._break(BrokenGPUExecutor(f"the executor's engine failed: {e!r}"))
        finally:
            with self.io:
                self._close()

    def _events(self, events: list) -> None:
        self.closed_fds = set()  # closed while handling this batch: their events are stale
        for fd, ev in events:
            if fd in self.closed_fds:
                continue
            if fd == self.wake_fd:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
                continue
            slot, kind = self.by_fd.get(fd, (None, None))
            if slot is None:
                continue
            if kind == "sock":
                if ev & select.EPOLLOUT:
                    try:
                        if slot.chan.flush():
                            self.ep.modify(fd, select.EPOLLIN)
                            self._flushed(slot)
                    except OSError:  # gone: the read below or its pidfd reports it
                        pass
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(slot)
            else:
                self._lost(slot)

    def _finished(self) -> bool:
        if self.broken is None and not self.shutting:
            return False
        if self.queue or any(s.inflight for s in self.slots):
            return False
        live = False
        for s in self.slots:
            if s.state in ("ready", "starting"):
                self._stop(s)
            if s.proc is not None:
                live = True
        return not live

    def _dispatch(self) -> None:
        """Sends queued calls to the workers with room, the least busy first, none more than its
        share of the queue (a worker that starts first does not take a whole burst)."""
        if self.broken is not None or self.killing or self.closing or not self.queue:
            return
        q = self.queue
        open_ = [s for s in self.slots if s.capacity(self.max_tasks) > 0]
        live = sum(s.state in ("starting", "ready") for s in self.slots)
        share = max(1, -(-len(q) // max(live, 1)))
        for s in sorted(open_, key=lambda s: len(s.inflight)):
            room = min(s.capacity(self.max_tasks), share)
            frames = []
            while room and q:
                with self.lock:
                    if not q:
                        break
                    c = q.popleft()
                if not c.begin():
                    continue
                frames += self._frames(s, c)
                s.inflight.append(c)
                s.sent += 1
                room -= 1
            if frames:
                self._write(s, frames)
            if not q:
                return

    def _frames(self, s: _Slot, c: Call) -> list:
        c.id = self.next_id
        self.next_id += 1
        now = time.time()
        c.started = max(now, s.last_end) if s.inflight else now
        chan = s.chan
        out = []
        fn_id = self._fn_id(c.fn.key)
        if fn_id in s.fn_ids:
            s.fn_ids.move_to_end(fn_id)
        else:
            out.append(chan.pack(("fn", fn_id), c.fn.payload))
            s.fn_ids[fn_id] = c.fn.nbytes
            s.fn_bytes += c.fn.nbytes
            forget = []
            while len(s.fn_ids) > _FN_CACHE or s.fn_bytes > _FN_CACHE_BYTES and len(s.fn_ids) > 1:
                old, n = s.fn_ids.popitem(last=False)
                s.fn_bytes -= n
                forget.append(old)
            if forget:
                out.append(chan.pack(("forget", forget)))
        out.append(chan.pack(("call", c.id, fn_id, c.chunked), c.args))
        return out

    def _fn_id(self, key) -> int:
        got = self.fn_keys.get(key)
        if got is None:
            got = self.fn_keys[key] = self.next_fn
            self.next_fn += 1
            if len(self.fn_keys) > 4 * _FN_CACHE:
                self.fn_keys.popitem(last=False)  # workers forget it in time (their own LRU)
        else:
            self.fn_keys.move_to_end(key)
        return got

    def _write(self, s: _Slot, frames: list) -> None:
        chan = s.chan
        plain = []
        for frame, fds in frames:
            if fds:
                if plain:
                    chan.queue(b"".join(plain), [])
                    plain = []
                chan.queue(frame, fds)
            else:
                plain.append(frame)
        if plain:
            chan.queue(plain[0] if len(plain) == 1 else b"".join(plain), [])
        try:
            done = chan.flush()
        except OSError:  # the worker is gone: its pidfd or EOF reports it
            return
        if not done:
            self.ep.modify(chan.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        else:
            self._flushed(s)

    @staticmethod
    def _flushed(s: _Slot) -> None:
        for c in reversed(s.inflight):  # every call frame is out: the worker may have started them
            if c.sent:
                break
            c.sent = True

    def _read(self, s: _Slot) -> None:
        try:
            frames, eof = s.chan.read_available()
        except OSError:
            frames, eof = [], True
        touched: set = set()
        for header, payload in frames:
            self._frame(s, header, payload, touched)
            if s.chan is None:
                break
        for job in touched:
            job.wake()
        if eof and s.chan is not None:
            self._lost(s)

    def _frame(self, s: _Slot, header, payload, touched: Optional[set] = None) -> None:
        kind = header[0]
        if kind in ("ok", "error"):
            c = s.inflight.popleft()
            assert c.id == header[1], (c.id, header)
            end = time.time()
            # how long a call takes here sets how many may wait in the worker (Note [Calls in flight])
            took = end - max(c.started, s.last_end)
            s.svc = took if s.svc is None else 0.8 * s.svc + 0.2 * took
            s.depth = max(DEPTH, min(MAX_DEPTH, int(_WORK_AHEAD / max(s.svc, 1e-6))))
            s.last_end = end
            if kind == "ok":
                try:
                    ok, value = True, payload.load()
                except BaseException as e:  # noqa: BLE001 - SystemExit from a __reduce__ included
                    ok, value = False, BrokenProcessPool(f"the result of {c.name} from {s.where()} could not be "
                                                         f"unpickled here: {type(e).__name__}: {e}")
                    value.__cause__ = e
            else:
                ok, value = False, self.rebuild(header[2], header[3], header[4], s.where())
            payload = None
            s.done += 1
            if self.record is not None:
                self.record(c.name, s.device, s.slot, c.started, end, None if ok else value)
            c.finish(ok, value, touched)
            value = None
            if self.max_tasks and s.done >= self.max_tasks and s.state == "ready":
                self._stop(s)  # recycled: memory a library never freed comes back
        elif kind == "ready":
            s.state = "ready"
            s.false_starts = 0
        elif kind == "init_error":
            err = self.rebuild(header[1], header[2], header[3], f"the initializer of {s.where()}")
            broken = BrokenGPUExecutor(f"the initializer of {s.where()} raised {header[3]}; the executor "
                                       "is broken")
            broken.__cause__ = err
            self._break(broken)

    def _lost(self, s: _Slot) -> None:
        """The worker's process ended (or its socket did)."""
        if s.chan is not None:
            try:
                frames, _ = s.chan.read_available()  # results it sent before it went
            except OSError:
                frames = []
            for header, payload in frames:
                self._frame(s, header, payload)
        if s.proc is None:
            return
        if s.proc.poll() is None:
            stop_group([s.proc], self.grace)
        code = s.proc.wait()
        was = s.state
        where = s.where()
        self._down(s)
        if self.broken is not None:
            return
        if was == "starting":
            # nothing it was sent had started; a second death in a row before it is ready is not
            # bad luck (an initializer that crashes, an interpreter that cannot start): broken
            s.false_starts += 1
            if s.false_starts >= 2:
                self._break(BrokenGPUExecutor(f"{where} exited ({describe_exit(code)}) before it was ready, "
                                              f"{s.false_starts} times in a row"
                                              + (" (in its initializer)" if self.init_payload is not None else "")
                                              + "; the executor is broken"))
                return
            for c in s.inflight:
                c.sent = False
        if s.inflight and self.killing:
            err = WorkerDiedError(f"{where} was stopped ({describe_exit(code)}) while running a call, by the "
                                  "executor's kill sequence", s.device, code)
            for c in s.inflight:
                c.finish(False, err)
            s.inflight.clear()
        if s.inflight:
            first = s.inflight.popleft()
            back = list(s.inflight)
            s.inflight.clear()
            if first.sent:
                err = WorkerDiedError(f"{where} died ({describe_exit(code)}) while running a call; it was replaced",
                                      s.device, code)
                if self.record is not None:
                    self.record(first.name, s.device, s.slot, first.started, time.time(), err)
                first.finish(False, err)
            else:
                back.insert(0, first)
            with self.lock:
                self.queue.extendleft(reversed(back))  # never started: first in line again
        if not self.killing and (not self.shutting or self.queue):
            self._start(s)

    # ---- worker processes ---------------------------------------------------------------------
    def _start(self, s: _Slot) -> None:
        proc, sock = start_worker(self.sup, {"CUDA_VISIBLE_DEVICES": s.visible, "GPUFLEET_DEVICE": s.device,
                                             "GPUFLEET_SLOT": str(s.slot), "GPUFLEET_WORKER": str(s.index)},
                                  pass_fds=self.init_fds)
        sock.setblocking(False)
        s.proc, s.chan = proc, _ipc.Channel(sock)
        s.state, s.sent, s.done, s.deadline, s.kill_stage = "starting", 0, 0, None, 0
        s.fn_ids.clear()
        s.fn_bytes = 0
        info = {"rank": s.index, "device": s.device, "slot": s.slot}
        s.chan.queue(*s.chan.pack(("hello", self.prep(), "executor", info), self.init_payload))
        fd = sock.fileno()
        self.by_fd[fd] = (s, "sock")
        self.ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
        try:
            s.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # no pidfd: the socket's EOF reports the death
            s.pidfd = -1
        else:
            self.by_fd[s.pidfd] = (s, "pid")
            self.ep.register(s.pidfd, select.EPOLLIN)

    def _stop(self, s: _Slot) -> None:
        """Asks a worker to exit once its calls are done; the kill sequence after the grace."""
        if s.state in ("stopping", "down"):
            return
        s.state = "stopping"
        s.deadline = time.monotonic() + self.grace
        s.chan.queue(*s.chan.pack(("stop",)))
        try:
            if not s.chan.flush():
                self.ep.modify(s.chan.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        except OSError:
            pass

    def _deadlines(self) -> Optional[float]:
        """Escalates stops that take too long (SIGTERM, then SIGKILL); the next poll timeout."""
        import signal

        now = time.monotonic()
        soonest = None
        for s in self.slots:
            if s.state != "stopping" or s.deadline is None or s.proc is None:
                continue
            if now >= s.deadline:
                if s.kill_stage < 2:
                    sig = signal.SIGTERM if s.kill_stage == 0 else signal.SIGKILL
                    try:
                        os.killpg(s.proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                    s.kill_stage += 1
                    s.deadline = now + self.grace
            if s.kill_stage < 2:
                soonest = s.deadline if soonest is None else min(soonest, s.deadline)
        if soonest is None:
            return None
        return max(0.0, soonest - now)

    def _down(self, s: _Slot) -> None:
        if s.chan is not None:
            fd = s.chan.sock.fileno()
            if fd >= 0:
                self.closed_fds.add(fd)
                self.by_fd.pop(fd, None)
                try:
                    self.ep.unregister(fd)
                except (OSError, ValueError):
                    pass
            s.chan.close()
        if s.pidfd >= 0:
            self.closed_fds.add(s.pidfd)
            self.by_fd.pop(s.pidfd, None)
            try:
                self.ep.unregister(s.pidfd)
            except (OSError, ValueError):
                pass
            os.close(s.pidfd)
            s.pidfd = -1
        if s.proc is not None:
            stop_group([s.proc], 0)  # whatever the worker left in its process group
            self.sup.forget(s.proc)
        s.proc = s.chan = None
        s.state = "down"

    def _break(self, exc: BaseException) -> None:
        with self.lock:
            if self.broken is not None:
                return
            self.broken = exc
            queued = list(self.queue)
            self.queue.clear()
        failed = queued + [c for s in self.slots for c in s.inflight]
        for s in self.slots:
            s.inflight.clear()
            if s.proc is not None:
                # asked, not killed: a worker whose initializer failed is exiting by itself and
                # flushes what it logged (ProcessPoolExecutor's tests read it through a queue)
                self._stop(s)
        for c in failed:
            if c.sink is not None and c.begin():
                c.finish(False, exc)

    def _close(self) -> None:
        self.closing = True
        for s in self.slots:
            if s.proc is not None:
                if s.proc.poll() is None:
                    stop_group([s.proc], self.grace)
                s.proc.wait()
            self._down(s)
        with self.lock:
            self.shutting = True
            leftover = list(self.queue)
            self.queue.clear()
        for c in leftover:  # only after a failure of the engine itself
            if c.sink is not None and c.begin():
                c.finish(False, self.broken or BrokenGPUExecutor("the executor stopped"))
        self.sup.close()
        self.ep.close()
        with self.lock:
            os.close(self.wake_fd)
            self.wake_fd = -1
        _live.discard(self)


# ---- interpreter exit: queued calls complete, as with ProcessPoolExecutor --------------------------

_live: "set[Engine]" = set()
_global_shutdown = False


def _at_exit() -> None:
    """Runs when the main thread ends, before Python joins threads (threading._register_atexit, as
    concurrent.futures does): every engine finishes its queued calls and stops its workers; a
    Ctrl-C while waiting kills them."""
    global _global_shutdown
    _global_shutdown = True
    engines = list(_live)
    try:
        for e in engines:
            e.shutdown(cancel=False)
        for e in engines:
            e.thread.join()
    except KeyboardInterrupt:
        for e in engines:
            e.kill()
        raise


threading._register_atexit(_at_exit)


def refuse_if_closed(engine) -> None:
    """Raises what ``submit`` raises on a broken or shut-down executor (this engine, or the cluster's:
    gpufleet/cluster/_executor.py)."""
    if engine.broken is not None:
        raise BrokenGPUExecutor(str(engine.broken))
    if _global_shutdown:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")
    if engine.shutting:
        raise RuntimeError("cannot schedule new futures after shutdown")


def cancel_calls(calls: list) -> None:
    """Cancels calls that were never handed to a worker (their futures, or their map job's slots)."""
    for c in calls:
        if isinstance(c.sink, Future):
            c.sink.cancel()
        elif c.sink is not None:
            c.sink.cancelled = True
