"""The gpufleet agent: one Ray actor per GPU node of a cluster run, running the C++ dispatcher there
(Note [Cluster runs] in __init__.py). This module is imported on the nodes; it does not import Ray at
module level (the driver wraps ``Agent`` with ``ray.remote``), so it is also plain, testable Python.

An agent's dispatcher has an open input (Note [Open input]): the driver's ``submit`` puts tasks in
the agent's inbox, and the dispatcher's ``pull`` takes from it only what the node's free slots on
GPUs that are not quarantined can start now (Note [Feeding the nodes]), so a task still in the inbox
can be taken back (``withdraw``). The dispatcher quarantines GPUs by the driver's rule (the same
``quarantine_after``, counted over the same tasks); the agent counts along, so that it never hands a
task to a dispatcher whose every GPU is quarantined (with an open input, that task would wait for
ever): such tasks go back to the driver "not started", and it places them elsewhere.
Events go back in batches through ``poll``, the driver's long-poll, with the node's free-memory
sample. After a drain or a cancel, or once its dispatcher has ended, whatever reaches the agent is
answered "not started" at once, so the driver never waits for a task that no dispatcher holds.
"""
from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
import traceback
from typing import Optional

from .. import _core

# The dispatcher's own message when it quarantines a GPU (completion.cpp): the driver says it, with the node
_QUARANTINE = re.compile(r"cuda:\d+ quarantined after \d+ consecutive failed tasks; its tasks go elsewhere")

# (kind, seq, name, attempt, devices (pool positions), slot, start, end, status, exit_code, signal, final,
#  log_path, message, pid): a TaskEvent as the driver receives it
EVENT_FIELDS = ("kind", "seq", "name", "attempt", "devices", "slot", "start", "end", "status", "exit_code", "signal",
                "final", "log_path", "message", "pid")


def _event(e) -> tuple:
    return (e.kind, e.seq, e.name, e.attempt, list(e.devices), e.slot, e.start, e.end, e.status, e.exit_code,
            e.signal, e.final, e.log_path, e.message, e.pid)


def _not_started(spec: tuple, why: str) -> tuple:
    now = time.time()
    return ("not_started", spec[0], os.fsdecode(spec[2]), 0, [], -1, now, now, "not_started", None, None, True, "",
            why, 0)


class Agent:
    """The node's dispatcher and its inbox. Methods are called by the driver through Ray (a threaded
    actor: ``poll`` waits while ``submit`` and ``withdraw`` go on)."""

    def __init__(self) -> None:
        from .. import _devices
        from . import _ray

        self.name = _ray.node_name()
        self.devices = list(_devices.devices())  # what Ray's CUDA_VISIBLE_DEVICES lets this actor see
        self.pool = _core.make_pool(list(range(len(self.devices))))
        self.lock = threading.Condition(threading.Lock())
        self.inbox: collections.deque = collections.deque()  # spec tuples (TaskSpec arguments + first_attempt)
        self.outbox: list = []
        self.slots = 1
        self.quarantine_after = 0
        self.busy = [0] * len(self.pool)  # running tasks per GPU
        self.fails = [0] * len(self.pool)  # consecutive failed tasks per GPU (Note [Cluster runs])
        self.quarantined = [False] * len(self.pool)
        self.waiting_gpus = 0  # GPUs of the tasks handed to the dispatcher that have not started
        self.cpu_free = 0
        self.taken: dict = {}  # seq -> (gpus, GPUs it runs on, or None before it starts)
        self.stopping = False  # drained, cancelled, or the dispatcher ended: nothing more starts here
        self.ended = False
        self.error: Optional[str] = None
        self.dispatcher = None
        self.thread: Optional[threading.Thread] = None
        self.totals: Optional[dict] = None
        self.last_memory = -1e30
        self.memory_poll = 0.5

    # ---- what the driver calls --------------------------------------------------------------------
    def describe(self) -> dict:
        """This node as the driver plans with it: its GPUs, their memory now, gpufleet's version."""
        import socket

        try:
            import ray

            node_id, gpu_ids = ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # not in Ray (tests of the class itself)
            node_id, gpu_ids = "", []
        return {"name": self.name, "host": socket.gethostname(), "node_id": node_id, "pid": os.getpid(),
                "version": _core.__version__, "python": sys.version.split()[0], "gpu_ids": gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "devices": [{"ordinal": i, "name": g.name, "visible_id": p.visible_id, "uuid": g.uuid,
                             "total": g.total_memory, "free": g.free_memory, "source": g.source}
                            for i, (g, p) in enumerate(zip(self.devices, self.pool))]}

    def start(self, label: str, config: dict) -> str:
        """Starts the node's dispatcher; returns its process marker (GPUFLEET_RUN_ID=...)."""
        os.environ["GPUFLEET_NODE"] = label  # inherited by every task (the dispatcher reads the environment now)
        slots = self.slots = config["slots_per_device"]
        self.quarantine_after = config["quarantine_after"]
        self.cpu_free = cpu = config["cpu_slots"] or max(1, len(self.pool) * slots)
        self.memory_poll = config["memory_poll"]
        log_dir = config["log_dir"]
        self.dispatcher = _core.Dispatcher(
            list(range(len(self.pool))), slots, cpu, self.quarantine_after, float(config["kill_grace"]), 0.0,
            config["output"],
            b"" if log_dir is None else os.fsencode(log_dir), b"", False, False, 0, float(config["memory_poll"]),
            0.0, os.fsencode(config["description"]), self._pull, self._on_events, -1, None, True, config["run_id"])
        marker = self.dispatcher.marker
        self.thread = threading.Thread(target=self._run, name="gpufleet-agent", daemon=True)
        self.thread.start()
        return marker

    def submit(self, specs: list) -> None:
        with self.lock:
            if self.stopping:
                self.outbox += [_not_started(s, "the node's dispatcher had stopped") for s in specs]
                self.lock.notify_all()
                return
            self.inbox.extend(specs)
            self._refuse_if_quarantined()
        self.dispatcher.notify_input()

    def withdraw(self, n: Optional[int]) -> list:
        """Takes back up to ``n`` tasks (all with None) that the dispatcher has not taken; their seqs."""
        with self.lock:
            k = len(self.inbox) if n is None else min(n, len(self.inbox))
            return [self.inbox.pop()[0] for _ in range(k)][::-1]

    def poll(self, wait: float) -> dict:
        """Events since the last poll (waits up to ``wait`` seconds for some), the memory sample when
        one is due, and whether the dispatcher has ended."""
        end = time.monotonic() + wait
        with self.lock:
            while not self.outbox and not self.ended and time.monotonic() < end:
                self.lock.wait(max(0.0, end - time.monotonic()))
            events, self.outbox = self.outbox, []
            ended = self.ended and not self.outbox
        memory = None
        if time.monotonic() - self.last_memory >= self.memory_poll:
            self.last_memory = time.monotonic()
            memory = self._memory()
        return {"events": events, "memory": memory, "ended": ended, "error": self.error, "totals": self.totals}

    def drain(self) -> None:
        self._stop("drained before it started")
        self.dispatcher.drain()

    def cancel(self) -> None:
        self._stop("cancelled before it started")
        self.dispatcher.cancel()

    def close(self) -> None:
        """No more input: the dispatcher ends once its tasks are done."""
        self.dispatcher.close_input()

    def finish(self, timeout: float) -> Optional[dict]:
        """Waits for the dispatcher to end (after ``close``); its totals, or None if it did not."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.totals

    # ---- the dispatcher's side (its thread, with the GIL) -----------------------------------------
    def _free_gpus(self) -> int:
        """GPU slots that can start a task now: free slots on healthy GPUs, less those promised."""
        free = sum(self.slots - b for b, q in zip(self.busy, self.quarantined) if not q and b < self.slots)
        return free - self.waiting_gpus

    def _pull(self, want: int) -> list:
        out = []
        with self.lock:
            if self.stopping:
                return out
            keep: collections.deque = collections.deque()
            while self.inbox and len(out) < want:
                spec = self.inbox.popleft()
                gpus = spec[7]
                if gpus == 0 and self.cpu_free > 0:
                    self.cpu_free -= 1
                elif 0 < gpus <= self._free_gpus():
                    self.waiting_gpus += gpus
                else:
                    keep.append(spec)  # no room for it now: it waits (a smaller task behind it may fit)
                    continue
                self.taken[spec[0]] = (gpus, None)
                out.append(_core.TaskSpec(*spec[:12], first_attempt=spec[12]))
            keep.extend(self.inbox)
            self.inbox = keep
        return out

    def _on_events(self, events) -> None:
        batch = [_event(e) for e in events if not (e.kind == "message" and _QUARANTINE.fullmatch(e.message))]
        with self.lock:
            for e in events:
                if e.kind != "message" and e.seq in self.taken:
                    self._account(e)
            self.outbox += batch
            self._refuse_if_quarantined()
            self.lock.notify_all()
            more = bool(self.inbox)
        if more:
            self.dispatcher.notify_input()

    def _refuse_if_quarantined(self) -> None:
        """Once every GPU here is quarantined, GPU tasks go back to the driver (lock held)."""
        if self.quarantined and all(self.quarantined) and any(s[7] > 0 for s in self.inbox):
            gpu = [s for s in self.inbox if s[7] > 0]
            self.inbox = collections.deque(s for s in self.inbox if s[7] == 0)
            self.outbox += [_not_started(s, "every GPU of its node is quarantined") for s in gpu]
            self.lock.notify_all()

    def _account(self, e) -> None:
        """Slots and quarantine as the dispatcher counts them (completion.cpp), from its events."""
        gpus, devs = self.taken[e.seq]
        if e.kind == "started":
            if gpus:
                self.waiting_gpus -= gpus
                for d in e.devices:
                    self.busy[d] += 1
            self.taken[e.seq] = (gpus, list(e.devices))
            return
        del self.taken[e.seq]
        if gpus == 0:
            self.cpu_free += 1
        elif devs is None:
            self.waiting_gpus -= gpus
        for d in devs or ():
            self.busy[d] -= 1
            if e.status == "succeeded":
                self.fails[d] = 0
            elif e.status != "cancelled":
                self.fails[d] += 1
                if 0 < self.quarantine_after <= self.fails[d]:
                    self.quarantined[d] = True

    def _run(self) -> None:
        try:
            self.totals = self.dispatcher.run()
        except BaseException as e:  # noqa: BLE001 - reported to the driver, which sends the tasks elsewhere
            self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        finally:
            self._stop("the node's dispatcher had stopped")
            with self.lock:
                self.ended = True
                self.lock.notify_all()

    def _stop(self, why: str) -> None:
        with self.lock:
            self.stopping = True
            self.outbox += [_not_started(s, why) for s in self.inbox]
            self.inbox.clear()
            self.lock.notify_all()

    def _memory(self) -> list:
        """(free, total) per pool position now, as the node's NVML (or simulation) reads them."""
        try:
            by_uuid = {g.uuid: g for g in _core.devices()}
            return [(by_uuid[g.uuid].free_memory, by_uuid[g.uuid].total_memory) if g.uuid in by_uuid
                    else (None, None) for g in self.devices]
        except Exception:  # noqa: BLE001 - a failed reading leaves the driver's last one
            return []
