"""The driver of a cluster run: ``gpufleet.run(tasks, cluster=...)`` (Note [Cluster runs] in
__init__.py; where tasks go: Note [Feeding the nodes] in _placement.py)."""
from __future__ import annotations

import collections
import itertools
import os
import sys
import time
import types
from typing import Any, Iterable, Optional

from .. import _core, _log as _logging
from .._dispatch import _as_task, _Events, _Interrupts, _Options
from .._dispatch_progress import _Progress
from .._dispatch_report import RunReport
from . import _agent, _ray
from ._placement import ClusterDevice, Flight, Node, choose, never_fits

_log = _logging.get("cluster")

POLL_WAIT = 0.5         # seconds an agent's poll waits for events before it answers anyway
AGENT_START_TIMEOUT = 120.0  # seconds for every agent to start (a node whose GPUs stay busy is left out)
LOST_LIMIT = 3          # a task whose node died this many times while it ran fails


class _Pending:
    """A task waiting in the driver's queue (or sent to a node: Flight.pending)."""

    __slots__ = ("task", "args", "spec", "attempt", "retries_used", "not_before", "avoid", "lost")

    def __init__(self, task, args: tuple, spec):
        self.task, self.args, self.spec = task, args, spec
        self.attempt = 1
        self.retries_used = 0
        self.not_before = 0.0
        self.avoid: Optional[tuple] = None  # (node name, ordinal) of the GPU that failed its last attempt
        self.lost = 0


class _Ev:
    """A task event as ``_Events`` reads it (the C++ TaskEvent's fields), with device names and the node."""

    __slots__ = ("kind", "seq", "name", "attempt", "devices", "slot", "start", "end", "status", "exit_code",
                 "signal", "final", "log_path", "message", "pid", "node")

    def __init__(self, kind: str, seq: int, name: str, *, attempt: int = 0, devices: Optional[list] = None,
                 slot: int = -1, start: float = 0.0, end: float = 0.0, status: str = "", exit_code=None, signal=None,
                 final: bool = True, log_path: str = "", message: str = "", pid: int = 0, node: Optional[str] = None):
        self.kind, self.seq, self.name, self.attempt = kind, seq, name, attempt
        self.devices = devices or []
        self.slot, self.start, self.end, self.status = slot, start, end, status
        self.exit_code, self.signal, self.final, self.log_path = exit_code, signal, final, log_path
        self.message, self.pid, self.node = message, pid, node


def run(tasks: Iterable, o: _Options, cluster: Any) -> RunReport:
    ray = _ray.connect(cluster, "gpufleet.run(cluster=...)")
    return _Run(ray, tasks, o).run()


class _Run:
    def __init__(self, ray, tasks: Iterable, o: _Options):
        self.ray, self.o = ray, o
        self.run_id = _core.random_token()[:12]
        self.token = _core.random_token()[:12]
        self.it = iter(tasks)
        self.seq = itertools.count()
        self.source_done = False
        self.queue: collections.deque = collections.deque()
        self.claims: dict = {}  # output path (resolved) -> task number: Note [Output collisions], across nodes
        self.stop: Optional[str] = None  # "drain", "cancel" or "lost" (no node left)
        self.drained = self.cancelled = False
        self.interrupts = 0
        self.cwd = os.getcwd()
        self.journal = None
        if o.journal is not None:  # a file that is not a journal is refused before any node is touched
            self.journal = _core.Journal(os.fsencode(o.journal))
            self.journal.begin_run(self.run_id, " ".join(sys.argv)[:1000])
        try:
            self.nodes = _start_agents(ray, o, self.run_id)
        except BaseException:
            self._close_journal("error")
            raise
        self.pool = [ClusterDevice(n.name, d.ordinal, info["name"], info["visible_id"], info["total"])
                     for n in self.nodes for d, info in zip(n.devs, n.desc["devices"])]
        self.where = [(n, d) for n in self.nodes for d in n.devs]  # cluster GPU position -> (node, GPU)
        self.lookahead = 4 * (len(self.pool) * o.slots_per_device + sum(n.cpu_free for n in self.nodes)) + 16
        self.report = o.new_report(self.pool)
        self.bar = _Progress(self.pool, o.slots_per_device, o.total, info=self._info) if o.progress else None
        self.events = _Events(o, self.report, self.bar, self, lambda ev: ev.devices)

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> RunReport:
        status = "error"
        try:
            with _Interrupts(self._interrupt):
                self._loop()
            status = "cancelled" if self.cancelled else "drained" if self.drained else "finished"
            self._finish_agents()
        except BaseException:
            self._kill_agents()
            raise
        finally:
            self._close_journal(status)
            self.report.finished = time.time()
            if self.bar is not None:
                self.bar.close()
        return self.o.finish_report(self.report, {"run_id": self.run_id, "drained": self.drained,
                                                  "cancelled": self.cancelled})

    def _loop(self) -> None:
        while True:
            self._take_interrupts()
            if self.stop is None:
                self._fill()
                self._place()
                self._steal()
            if self._done():
                return
            self._wait()

    def _done(self) -> bool:
        return ((self.source_done or self.stop is not None) and not self.queue
                and not any(n.flights or n.withdraw_ref is not None for n in self.nodes if n.alive))

    def _wait(self) -> None:
        now = time.monotonic()
        timeout = 0.05
        for p in self.queue:
            if p.not_before > now:
                timeout = min(timeout, p.not_before - now)
        refs = {}
        for n in self.nodes:
            if n.alive:
                if n.poll_ref is None:
                    n.poll_ref = n.actor.poll.remote(POLL_WAIT)
                refs[n.poll_ref] = (n, "poll")
                if n.withdraw_ref is not None:
                    refs[n.withdraw_ref] = (n, "withdraw")
        if not refs:
            return
        ready, rest = self.ray.wait(list(refs), num_returns=1, timeout=max(0.0, timeout))
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            node, what = refs[ref]
            if not node.alive:
                continue
            try:
                value = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - Ray's errors for a dead actor or node, or a bug in the agent
                self._lost(node, _ray.reason(e))
                continue
            if what == "poll":
                node.poll_ref = None
                self._reply(node, value)
            else:
                node.withdraw_ref = None
                self._withdrawn(node, value)

    # ---- input ------------------------------------------------------------------------------------
    def _fill(self) -> None:
        keyed = self.journal is not None
        while not self.source_done and len(self.queue) < self.lookahead:
            try:
                t = next(self.it)
            except StopIteration:
                self.source_done = True
                return
            t = _as_task(t)
            seq = next(self.seq)
            args = t._spec_args(seq, self.token, len(self.pool), keyed)
            p = _Pending(t, args, _core.TaskSpec(*args) if keyed else None)
            why = self._refused(p, seq)
            if why is not None:
                self._unstarted(p, *why)
            else:
                self.queue.append(p)

    def _refused(self, p: _Pending, seq: int) -> Optional[tuple]:
        """(status, why) for a task that ends before it is placed (the checks of admission.cpp's accept)."""
        t = p.task
        why = never_fits(self.nodes, t.gpus, t.min_free_memory) if t.gpus else None
        if why is not None and t.gpus > max(len(n.devs) for n in self.nodes):
            return "failed", why
        for out in t.outputs:
            other = self.claims.setdefault(os.path.realpath(out), seq)
            if other != seq:
                return "failed", (f"its output '{out}' is also the output of task {other + 1}: two tasks would write "
                                  "one file (make the output name unique per task, e.g. with {#} or {//})")
        if self.o.resume and self.journal is not None:
            found = self.journal.lookup(p.args[1])
            if found is not None:
                state, start = found
                if state == "succeeded" and all(os.path.exists(x) for x in t.outputs):
                    return "skipped", "succeeded in an earlier run (journal) and its outputs exist"
                if state == "running" and _renamed_since(t.outputs, start):
                    return "skipped", ("succeeded in an interrupted run: its outputs were renamed into place after "
                                       "its last attempt started, before the journal recorded its end (Note [Re-runs "
                                       "after a crash])")
        if self.o.skip_existing and t.outputs and all(os.path.exists(x) for x in t.outputs):
            return "skipped", "its outputs exist"
        return None

    def _unstarted(self, p: _Pending, status: str, why: str) -> None:
        """A task that ends without running (csrc's finish_unstarted): failed, skipped or not started."""
        kind = {"skipped": "skipped", "not_started": "not_started"}.get(status, "finished")
        now = time.time()
        if status == "failed" and self.journal is not None:
            self.journal.record_finish(p.spec, 0, "", -1, now, now, "failed", None, None, True, "", why, self.run_id)
        self.events([_Ev(kind, p.args[0], p.task.name, status=status, start=now, end=now, message=why)])

    # ---- placement --------------------------------------------------------------------------------
    def _place(self) -> None:
        if not self.queue:
            return
        now = time.monotonic()
        batches: dict = {}
        keep = collections.deque()
        while self.queue:
            p = self.queue.popleft()
            if p.not_before > now:
                keep.append(p)
                continue
            t = p.task
            why = never_fits(self.nodes, t.gpus, t.min_free_memory)
            if why is not None:
                self._unstarted(p, "failed", why)
                continue
            prefer = None
            aff = p.args[11]
            if aff >= 0 and aff < len(self.where):
                prefer = self.where[aff]
            got = choose(self.nodes, t.gpus, t.min_free_memory, p.avoid, prefer, may_prefetch=t.affinity is None)
            if got is None:
                keep.append(p)
                continue
            node, planned = got
            batches.setdefault(node, []).append(self._send(node, p, planned))
        self.queue = keep
        for node, specs in batches.items():
            node.actor.submit.remote(specs)

    def _send(self, node: Node, p: _Pending, planned: Optional[list]) -> tuple:
        """Books ``p`` on ``node`` (Note [Feeding the nodes]); the spec the agent gets."""
        t = p.task
        node.flights[p.args[0]] = Flight(p, planned)
        if planned is None:
            node.prefetched += 1
        elif t.gpus == 0:
            node.cpu_free -= 1
        else:
            for i in planned:
                node.devs[i].take(t.min_free_memory)
        a = p.args
        local = planned[0] if planned and t.gpus == 1 else -1
        # the node's own checks are off (the driver made them), its retries are the driver's, and a task
        # without a working directory runs in the driver's (a shared file system: README)
        return (a[0], a[1], a[2], a[3], a[4], a[5] or os.fsencode(self.cwd), a[6], a[7], a[8], a[9], 0, local,
                p.attempt)

    def _release(self, node: Node, f: Flight) -> None:
        t = f.pending.task
        if f.started:
            devs = f.devices
        elif f.planned is None:
            node.prefetched -= 1
            return
        else:
            devs = f.planned
        if t.gpus == 0:
            node.cpu_free += 1
        for i in devs:
            node.devs[i].give(t.min_free_memory)

    def _steal(self) -> None:
        """Note [Feeding the nodes]: tasks sent ahead to a busy node go to an idle one at the tail."""
        if any(p.task.gpus for p in self.queue):
            return
        idle = sum(n.free_gpu_slots() for n in self.nodes if n.alive and not n.ended)
        if idle == 0:
            return
        for n in self.nodes:
            if n.alive and n.prefetched > 0 and n.withdraw_ref is None and n.free_gpu_slots() == 0:
                take = min(idle, n.prefetched)
                n.withdraw_ref = n.actor.withdraw.remote(take)
                idle -= take
                if idle <= 0:
                    return

    def _withdrawn(self, node: Node, seqs: list) -> None:
        for seq in reversed(seqs):
            f = node.flights.pop(seq, None)
            if f is not None:
                self._release(node, f)
                self.queue.appendleft(f.pending)

    # ---- what the agents report -------------------------------------------------------------------
    def _reply(self, node: Node, reply: dict) -> None:
        if reply["memory"]:
            node.sample(reply["memory"])
        out = []
        for e in reply["events"]:
            ev = self._event(node, e)
            if ev is not None:
                out.append(ev)
        if out:
            self.events(out)
        if reply["error"] is not None:
            self._lost(node, f"its dispatcher failed: {reply['error'].splitlines()[0]}")
        elif reply["ended"]:
            node.ended = True
            if node.flights:  # it ended with tasks it never reported: they go elsewhere
                self._lost(node, "its dispatcher ended")

    def _event(self, node: Node, e: tuple) -> Optional[_Ev]:
        kind, seq, name, attempt, devs, slot, start, end, status, exit_code, sig, final, log_path, message, pid = e
        if kind == "message":
            self.events.message(f"{node.name}: {message}")
            return None
        f = node.flights.get(seq)
        if f is None:
            return None
        p = f.pending
        names = [node.devs[i].label for i in devs]
        ev = _Ev(kind, seq, name, attempt=attempt, devices=names, slot=slot, start=start, end=end, status=status,
                 exit_code=exit_code, signal=sig, final=True, log_path=log_path, message=message, pid=pid,
                 node=node.name)
        if kind == "started":
            self._started(node, f, devs, slot, start)
            if self.journal is not None:
                self.journal.record_start(p.spec, attempt, ",".join(names) or "cpu", slot, start, log_path,
                                          self.run_id)
            return ev
        del node.flights[seq]
        self._release(node, f)
        if kind == "not_started":
            if self.stop is None:  # the node stopped on its own (its dispatcher ended): elsewhere
                self.queue.appendleft(p)
                return None
            return ev
        # finished: quarantine and retries are the driver's (Note [Cluster runs])
        self._device_outcome(node, devs, status)
        ev.final = not self._retry(p, status, node, devs)
        if self.journal is not None:
            self.journal.record_finish(p.spec, attempt, ",".join(names) or ("cpu" if pid else ""), slot, start, end,
                                       status, exit_code, sig, ev.final, log_path, message, self.run_id)
        return ev

    def _started(self, node: Node, f: Flight, devs: list, slot: int, start: float) -> None:
        """The agent started ``f`` on ``devs``: the model follows (a planned GPU may differ)."""
        need = f.pending.task.min_free_memory
        if f.planned is None:
            node.prefetched -= 1
            for i in devs:
                node.devs[i].take(need)
        elif f.planned != devs:
            for i in f.planned:
                node.devs[i].give(need)
            for i in devs:
                node.devs[i].take(need)
        f.started, f.devices, f.slot, f.start = True, list(devs), slot, start
        if f.pending.task.gpus == 0 and f.planned is None:
            node.cpu_free -= 1

    def _device_outcome(self, node: Node, devs: list, status: str) -> None:
        for i in devs:
            d = node.devs[i]
            if status == "succeeded":
                d.failures = 0
            elif status != "cancelled":
                d.failures += 1
                q = self.o.quarantine_after
                if q > 0 and not d.quarantined and d.failures >= q:
                    d.quarantined = True
                    self.report.quarantined.append(d.label)
                    self.events.message(f"{d.label} quarantined after {d.failures} consecutive failed tasks; its "
                                        "tasks go elsewhere")

    def _retry(self, p: _Pending, status: str, node: Node, devs: list) -> bool:
        """Queues the next attempt of a failed task (retries with backoff, on another GPU), or False."""
        if status in ("succeeded", "cancelled") or p.retries_used >= p.task.retries or self.stop is not None:
            return False
        p.retries_used += 1
        p.not_before = time.monotonic() + self.o.retry_backoff * 2.0 ** (p.attempt - 1)
        p.attempt += 1
        p.avoid = (node.name, node.devs[devs[0]].ordinal) if devs else None
        self.queue.appendleft(p)
        return True

    # ---- faults -----------------------------------------------------------------------------------
    def _lost(self, node: Node, why: str) -> None:
        """Note [Cluster runs]: a node that is gone; what it held goes elsewhere."""
        if not node.alive:
            return
        node.alive = False
        _ray.kill(self.ray, node.actor)
        flights = sorted(node.flights.values(), key=lambda f: f.pending.args[0], reverse=True)
        node.flights.clear()
        running = [f for f in flights if f.started]
        self.events.message(f"node {node.name} lost ({why}): {len(running)} running task"
                            f"{'' if len(running) == 1 else 's'} go to other nodes as new attempts"
                            if running else f"node {node.name} lost ({why})")
        out = []
        for f in flights:
            p = f.pending
            if not f.started:
                self.queue.appendleft(p)
                continue
            out.append(self._lost_attempt(node, f))
        if out:
            self.events(out)
        if not any(n.alive for n in self.nodes):
            self._no_nodes()

    def _lost_attempt(self, node: Node, f: Flight) -> _Ev:
        p = f.pending
        names = [node.devs[i].label for i in f.devices]
        now = time.time()
        if _renamed_since(p.task.outputs, f.start):  # Note [Re-runs after a crash]: it did succeed
            status, msg, final = "succeeded", (f"succeeded on {node.name}, which was lost before it reported: its "
                                               "outputs were renamed into place after the attempt started"), True
        else:
            p.lost += 1
            final = p.lost >= LOST_LIMIT or self.stop is not None
            status = "failed"
            msg = (f"lost with its node {node.name}" + (f" ({p.lost} nodes were lost while it ran)" if final and
                                                         self.stop is None else ""))
        if self.journal is not None:
            self.journal.record_finish(p.spec, p.attempt, ",".join(names) or "cpu", f.slot, f.start, now, status, None,
                                       None, final, "", msg, self.run_id)
        ev = _Ev("finished", p.args[0], p.task.name, attempt=p.attempt, devices=names, slot=f.slot, start=f.start,
                 end=now, status=status, final=final, message=msg, pid=-1, node=node.name)
        if not final:
            p.attempt += 1
            self.queue.appendleft(p)
        return ev

    def _no_nodes(self) -> None:
        self.stop = "lost"
        self.events.message("no node of the cluster is left: the tasks that did not run are not started")
        self._not_started_all("no node of the cluster was left to run it")

    def _not_started_all(self, why: str) -> None:
        now = time.time()
        evs = [_Ev("not_started", p.args[0], p.task.name, status="not_started", start=now, end=now, message=why)
               for p in self.queue]
        self.queue.clear()
        if evs:
            self.events(evs)
        if not self.source_done:
            self.events.message("the rest of the input was not read (drained or cancelled)")

    # ---- drain and cancel (Ctrl-C, halt) ----------------------------------------------------------
    def _interrupt(self) -> None:
        self.interrupts += 1  # the signal handler only counts: the loop acts (_take_interrupts)

    def _take_interrupts(self) -> None:
        if self.interrupts >= 2 and not self.cancelled:
            self.cancel()
        elif self.interrupts == 1 and self.stop is None:
            self.drain()

    def _running(self) -> int:
        return sum(1 for n in self.nodes if n.alive for f in n.flights.values() if f.started)

    def drain(self) -> None:
        if self.stop is not None:
            return
        self.stop, self.drained = "drain", True
        n = self._running()
        self.events.message(f"draining: {n} running task{'' if n == 1 else 's'} will finish, nothing new starts "
                            "(Ctrl-C again cancels them)")
        for node in self.nodes:
            if node.alive:
                node.actor.drain.remote()
        self._not_started_all("drained before it started")

    def cancel(self) -> None:
        if self.cancelled:
            return
        first = self.stop is None
        self.stop, self.cancelled = "cancel", True
        n = self._running()
        self.events.message(f"cancelling: stopping {n} running task{'' if n == 1 else 's'} on every node (SIGTERM, "
                            f"then SIGKILL after {self.o.kill_grace:g} s)")
        for node in self.nodes:
            if node.alive:
                node.actor.cancel.remote()
        if first:
            self._not_started_all("cancelled before it started")

    # ---- the end ----------------------------------------------------------------------------------
    def _finish_agents(self) -> None:
        alive = [n for n in self.nodes if n.alive]
        for n in alive:
            n.actor.close.remote()
        refs = [n.actor.finish.remote(30.0) for n in alive]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=35.0)
        for n in self.nodes:
            _ray.kill(self.ray, n.actor)

    def _kill_agents(self) -> None:
        """On an error in the driver: every agent ends now, and its supervisor stops its tasks."""
        for n in self.nodes:
            _ray.kill(self.ray, n.actor)

    def _close_journal(self, status: str) -> None:
        if self.journal is not None:
            try:
                self.journal.end_run(self.run_id, status)
            finally:
                self.journal = None

    def _info(self) -> dict:
        """The progress display's per-GPU line: the last free-memory sample of its node."""
        return {d.label: types.SimpleNamespace(free_memory=d.free, utilization=None)
                for n in self.nodes for d in n.devs}


def _start_agents(ray, o: _Options, run_id: str) -> list:
    """One agent per GPU node, pinned to it and holding its GPUs; the nodes that started one."""
    nodes = _ray.gpu_nodes(ray)
    if not nodes:
        raise RuntimeError("the Ray cluster has no node with GPUs: start the nodes with their GPUs (`ray start "
                           "--num-gpus=N`, or let Ray detect them), then run again")
    cls = ray.remote(_agent.Agent)
    actors = [cls.options(num_gpus=n.gpus, num_cpus=0, max_concurrency=8, scheduling_strategy=_ray.pinned(n.node_id),
                          max_restarts=0).remote() for n in nodes]
    refs = [a.describe.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=AGENT_START_TIMEOUT)
    started, problems = [], []
    for n, a, r in zip(nodes, actors, refs):
        try:
            started.append((a, ray.get(r, timeout=0)))
        except Exception as e:  # noqa: BLE001 - its GPUs held by other Ray work, gpufleet missing there, ...
            problems.append(f"node {n.ip} ({n.node_id[:8]}): {_ray.reason(e)}")
            _ray.kill(ray, a)
    mismatch = [d for _, d in started if d["version"] != _core.__version__]
    if mismatch:
        for a, _ in started:
            _ray.kill(ray, a)
        raise RuntimeError("every node must run the same gpufleet as the driver (" + _core.__version__ + "): " +
                           ", ".join(f"{d['host']} has {d['version']}" for d in mismatch))
    for msg in problems:
        _log.warning("gpufleet: no agent on %s; the run goes on without that node", msg)
    usable = [(a, d) for a, d in started if d["devices"]]
    for a, d in started:
        if not d["devices"]:
            _log.warning("gpufleet: node %s: Ray lists GPUs there but gpufleet sees none (CUDA_VISIBLE_DEVICES=%s); "
                         "the run goes on without that node", d["host"], d["cuda_visible_devices"])
            _ray.kill(ray, a)
    if not usable:
        raise RuntimeError("no node of the cluster could run a gpufleet agent" +
                           (": " + "; ".join(problems) if problems else ""))
    names = _ray.unique_names([d["name"] for _, d in usable], [d["node_id"] for _, d in usable])
    out = sorted((Node(a, name, d, o.slots_per_device, o.cpu_slots) for (a, d), name in zip(usable, names)),
                 key=lambda n: n.name)
    config = {"slots_per_device": o.slots_per_device, "cpu_slots": o.cpu_slots, "kill_grace": o.kill_grace,
              "quarantine_after": o.quarantine_after,
              "output": o.output, "log_dir": None if o.log_dir is None else os.path.abspath(os.fspath(o.log_dir)),
              "memory_poll": o.memory_poll, "description": " ".join(sys.argv)[:1000], "run_id": run_id}
    markers = ray.get([n.actor.start.remote(n.name, config) for n in out])
    for n, m in zip(out, markers):
        n.marker = m
    return out


def _renamed_since(outputs: list, start: float) -> bool:
    """Every declared output exists and was written after ``start`` (admission.cpp's
    outputs_renamed_since, Note [Re-runs after a crash]: only a successful attempt's rename puts it
    there; 50 ms of slack for the file system's coarse clock)."""
    if not outputs:
        return False
    try:
        return all(os.stat(x).st_mtime >= start - 0.05 for x in outputs)
    except OSError:
        return False
