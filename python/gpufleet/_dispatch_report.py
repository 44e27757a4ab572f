"""What a run of commands reports: ``TaskRecord`` (per task), ``AttemptRecord`` (per attempt) and
``RunReport`` (totals, per device, the summary, the Chrome trace and the timeline), for a local run
(``gpufleet.run``) and a cluster run (``gpufleet.run(cluster=...)``, whose devices are named by node,
``"node-a/cuda:0"``: Note [Reports by node])."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import _display

PathLike = Union[str, "os.PathLike[str]"]

# Note [Reports by node]
# ~~~~~~~~~~~~~~~~~~~~~~
# A local run's devices are "cuda:N". A cluster run's are "<node>/cuda:N" (the pool entries carry a
# ``label`` and a ``node``: cluster/_driver.py), and every record names its node (``node``; None in a
# local run). The summary and the per-device table list them in the cluster's node order; the Chrome
# trace makes one process per node with one thread per device slot ("cuda:1 slot 0"), where a local
# run has one process per device and one thread per slot; the timeline keeps one row per device
# slot, grouped by node with a line between nodes.


def device_label(d) -> str:
    """The name of a pool entry in reports: ``"cuda:N"`` here, ``"<node>/cuda:N"`` on a cluster."""
    return getattr(d, "label", None) or f"cuda:{d.ordinal}"


def cpu_label(node: Optional[str]) -> str:
    """Where a CPU task ran: ``"cpu"``, or ``"<node>/cpu"`` on a cluster."""
    return f"{node}/cpu" if node else "cpu"


def node_of(device: str) -> Optional[str]:
    """The node part of a device name (``"node-a/cuda:0"`` -> ``"node-a"``), None for a local one."""
    node, sep, _ = device.rpartition("/")
    return node if sep else None


@dataclass
class TaskRecord:
    """What happened to one task (its last attempt), as ``RunReport.tasks`` lists it. ``number`` is
    the task's number as users see it (1-based, GNU parallel's ``{#}``: the summary, the joblog and
    the log file ``task-<number>.attempt-<k>.log``); ``seq`` is its 0-based position in the input."""

    seq: int
    name: str
    status: str                 # succeeded, failed, timed_out, cancelled, skipped, not_started
    devices: list = field(default_factory=list)   # e.g. ["cuda:0"]; [] for CPU tasks and unstarted ones
    slot: Optional[int] = None
    start: Optional[float] = None   # Unix time
    end: Optional[float] = None
    attempts: int = 0
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    log_path: Optional[str] = None
    message: str = ""
    node: Optional[str] = None      # the cluster node it ran on (Note [Reports by node]); None locally

    @property
    def duration(self) -> Optional[float]:
        return None if self.start is None or self.end is None else self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "skipped")

    @property
    def number(self) -> int:
        return self.seq + 1


@dataclass
class AttemptRecord:
    seq: int
    name: str
    attempt: int
    devices: list
    slot: int
    start: float
    end: float
    status: str
    node: Optional[str] = None

    @property
    def number(self) -> int:
        return self.seq + 1


class RunReport:
    """The outcome of ``gpufleet.run``: per task (``tasks``, in input order: ``tasks[i]`` is the i-th
    task when every task is recorded), per attempt (``attempts``, as they ended), per device
    (``devices``: busy fraction, tasks, failures) and totals; ``summary()``, ``to_chrome_trace(path)``,
    ``plot_timeline(path)``. Beyond ``max_records`` tasks only totals are kept (``records_truncated``)."""

    def __init__(self, pool: list, slots_per_device: int, max_records: int):
        self.pool = pool
        self._names = [device_label(d) for d in pool]
        self.slots_per_device = slots_per_device
        self.tasks: list[TaskRecord] = []
        self.attempts: list[AttemptRecord] = []
        self.max_records = max_records
        self.records_truncated = False
        self.counts = {"succeeded": 0, "failed": 0, "timed_out": 0, "cancelled": 0, "skipped": 0, "not_started": 0}
        self.started = time.time()
        self.finished: Optional[float] = None
        self.run_id = ""
        self.drained = False
        self.cancelled = False
        self.quarantined: list[str] = []
        self.halted: Optional[str] = None          # why --halt / halt= stopped the run
        self.halt_exit_status: Optional[int] = None  # GNU parallel's exit status for that halt
        self.messages: list[str] = []
        self.journal: Optional[str] = None
        self._busy = {}      # device name -> seconds
        self._dev_tasks = {}
        self._dev_fail = {}

    # totals
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def succeeded(self) -> int:
        return self.counts["succeeded"]

    @property
    def failed(self) -> int:
        """Tasks that failed or timed out. Cancelled and not started tasks are counted apart
        (``counts``): they did not fail, the run was stopped."""
        return self.counts["failed"] + self.counts["timed_out"]

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.counts["cancelled"] == 0 and self.counts["not_started"] == 0

    @property
    def wall_time(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def failed_tasks(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status in ("failed", "timed_out")]

    @property
    def cancelled_tasks(self) -> list[TaskRecord]:
        """Tasks stopped by a cancel (Ctrl-C twice, ``halt`` now) while they ran."""
        return [t for t in self.tasks if t.status == "cancelled"]

    @property
    def nodes(self) -> list[str]:
        """The cluster's nodes in the order the run listed them (Note [Reports by node]); [] locally."""
        return list(dict.fromkeys(n for n in map(node_of, self._names) if n is not None))

    @property
    def devices(self) -> dict:
        """Per device (``"cuda:0"``, on a cluster ``"node-a/cuda:0"``): ``busy`` (fraction of slot-time
        running tasks), ``tasks``, ``failures``, ``quarantined``; CPU tasks under ``"cpu"``."""
        wall = max(self.wall_time, 1e-9)
        out = {}
        for name in self._names:
            out[name] = {"busy": self._busy.get(name, 0.0) / (wall * self.slots_per_device),
                         "tasks": self._dev_tasks.get(name, 0), "failures": self._dev_fail.get(name, 0),
                         "quarantined": name in self.quarantined}
        for name in sorted(n for n in self._dev_tasks if n == "cpu" or n.endswith("/cpu")):
            out[name] = {"busy": None, "tasks": self._dev_tasks[name], "failures": self._dev_fail.get(name, 0),
                         "quarantined": False}
        return out

    def _attempt(self, ev, devs: list) -> None:
        dur = max(0.0, ev.end - ev.start)
        node = getattr(ev, "node", None)
        for name in devs or [cpu_label(node)]:
            self._busy[name] = self._busy.get(name, 0.0) + dur
            self._dev_tasks[name] = self._dev_tasks.get(name, 0) + 1
            if ev.status in ("failed", "timed_out"):  # a cancel is not the device's failure
                self._dev_fail[name] = self._dev_fail.get(name, 0) + 1
        if len(self.attempts) < self.max_records:
            self.attempts.append(AttemptRecord(ev.seq, ev.name, ev.attempt, devs, ev.slot, ev.start, ev.end, ev.status,
                                               node))

    def _final(self, rec: TaskRecord) -> None:
        self.counts[rec.status] = self.counts.get(rec.status, 0) + 1
        if len(self.tasks) < self.max_records:
            self.tasks.append(rec)
        else:
            self.records_truncated = True

    def summary(self) -> str:
        c = self.counts
        lines = [f"gpufleet run {self.run_id}: {self.total} task{'s' if self.total != 1 else ''} in "
                 f"{self.wall_time:.1f} s: {c['succeeded']} succeeded, {c['failed']} failed, {c['timed_out']} timed out, "
                 f"{c['cancelled']} cancelled, {c['skipped']} skipped, {c['not_started']} not started"]
        if self.halted:
            lines.append(f"halted: {self.halted}")
        elif self.drained or self.cancelled:
            lines.append("interrupted: " + ("cancelled (kill sequence)" if self.cancelled else "drained (running tasks finished)"))
        for name, d in self.devices.items():
            busy = "" if d["busy"] is None else f"busy {100 * d['busy']:5.1f}%  "
            lines.append(f"  {name:8s} {busy}tasks {d['tasks']:6d}  failures {d['failures']:4d}"
                         + ("  QUARANTINED" if d["quarantined"] else ""))
        failed = self.failed_tasks
        for t in failed[:10]:
            where = f" on {','.join(t.devices)}" if t.devices else ""
            log = f" (log: {t.log_path})" if t.log_path else ""
            lines.append(f"  FAILED #{t.number} {t.name!r}{where}: {t.message}{log}")
        if len(failed) > 10:
            lines.append(f"  ... and {len(failed) - 10} more failed tasks (report.failed_tasks)")
        cancelled = self.cancelled_tasks
        if cancelled:
            more = f" and {len(cancelled) - 20} more" if len(cancelled) > 20 else ""
            lines.append("  cancelled while running: " + ", ".join(f"#{t.number}" for t in cancelled[:20]) + more)
        if self.records_truncated:
            lines.append(f"  (per-task records kept for the first {self.max_records} tasks; totals cover all)")
        if self.journal:
            lines.append(f"  journal: {self.journal}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.counts
        return (f"RunReport(run_id={self.run_id!r}, tasks={self.total}, succeeded={c['succeeded']}, "
                f"failed={self.failed}, skipped={c['skipped']}, not_started={c['not_started']}, "
                f"wall_time={self.wall_time:.1f}s)")

    def _repr_html_(self) -> str:
        """The summary as tables (Note [Rich display]): totals, one row per device, failed tasks."""
        c = self.counts
        title = (f"gpufleet run {self.run_id}: {self.total} task{'s' if self.total != 1 else ''} in "
                 f"{self.wall_time:.1f} s: {c['succeeded']} succeeded, {c['failed']} failed, {c['timed_out']} "
                 f"timed out, {c['cancelled']} cancelled, {c['skipped']} skipped, {c['not_started']} not started")
        notes = []
        if self.drained or self.cancelled:
            notes.append("interrupted: " + ("cancelled" if self.cancelled else "drained (running tasks finished)"))
        if self.journal:
            notes.append(f"journal: {self.journal}")
        rows = [(name, "-" if d["busy"] is None else f"{100 * d['busy']:.1f}%", d["tasks"], d["failures"],
                 "yes" if d["quarantined"] else "") for name, d in self.devices.items()]
        out = _display.html_table(("device", "busy", "tasks", "failures", "quarantined"), rows, title=title,
                                  notes=notes, numeric=(1, 2, 3))
        failed = self.failed_tasks
        if failed:
            out += _display.html_table(
                ("task", "name", "status", "devices", "message", "log"),
                [(t.seq + 1, t.name, t.status, ",".join(t.devices), t.message, t.log_path or "") for t in failed[:10]],
                title=f"failed tasks ({len(failed)}{', first 10' if len(failed) > 10 else ''})")
        return out

    def to_chrome_trace(self, path: PathLike) -> str:
        """Writes the attempts as Chrome trace JSON (Perfetto, chrome://tracing): one process per device
        and one thread per slot, or on a cluster one process per node and one thread per device slot
        (Note [Reports by node]). Returns the path."""
        path = os.fspath(path)
        t0 = min((a.start for a in self.attempts), default=self.started)
        events = []
        names: dict = {}    # process name -> pid
        threads: dict = {}  # (pid, thread name) -> tid
        for a in self.attempts:
            for dev in a.devices or [cpu_label(a.node)]:
                node = node_of(dev)
                pid = names.setdefault(dev if node is None else node, len(names))
                if node is None:
                    tid = a.slot
                else:
                    tid = threads.setdefault((pid, f"{dev[len(node) + 1:]} slot {a.slot}"), len(threads))
                events.append({"name": a.name, "cat": a.status, "ph": "X", "ts": (a.start - t0) * 1e6,
                               "dur": max(0.0, a.end - a.start) * 1e6, "pid": pid, "tid": tid,
                               "args": {"task": a.seq + 1, "attempt": a.attempt, "status": a.status,
                                        **({"device": dev} if node is not None else {})}})
        for dev, pid in names.items():
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": dev}})
        for (pid, name), tid in threads.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                       "otherData": {"run_id": self.run_id, "tool": "gpufleet"}}, f)
        return path

    def plot_timeline(self, path: Optional[PathLike] = None) -> Any:
        """A Gantt chart of every slot of every device. Saved to ``path`` (whose path is returned), or,
        without one, returned as a matplotlib ``Figure`` (shown inline in Jupyter). Needs the ``plot``
        extra (matplotlib)."""
        rows = [(name, s) for name in self._names for s in range(self.slots_per_device)]
        if any(not a.devices for a in self.attempts):
            rows += sorted({(cpu_label(a.node), a.slot) for a in self.attempts if not a.devices})
        order = {n: i for i, n in enumerate(self.nodes)}
        rows.sort(key=lambda r: order.get(node_of(r[0]), -1))  # stable: by node, each node's GPUs before its CPU
        fig = _display.new_figure("RunReport.plot_timeline", path, figsize=(11, 1.2 + 0.35 * max(1, len(rows))))
        from matplotlib.patches import Patch

        index = {r: i for i, r in enumerate(rows)}
        colors = {"succeeded": "#4c9a2a", "failed": "#c0392b", "timed_out": "#e67e22", "cancelled": "#7f8c8d"}
        t0 = min((a.start for a in self.attempts), default=self.started)
        ax = fig.subplots()
        for a in self.attempts:
            for dev in a.devices or [cpu_label(a.node)]:
                i = index.get((dev, a.slot))
                if i is None:
                    continue
                ax.broken_barh([(a.start - t0, max(a.end - a.start, 1e-3))], (i - 0.4, 0.8),
                               facecolors=colors.get(a.status, "#34495e"), edgecolor="white", linewidth=0.3)
        for i in range(1, len(rows)):  # Note [Reports by node]: a line between two nodes' rows
            if node_of(rows[i][0]) != node_of(rows[i - 1][0]):
                ax.axhline(i - 0.5, color="#2c3e50", linewidth=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{d.replace('/', ' ')} slot {s}" for d, s in rows])
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the first task started")
        ax.set_title(f"gpufleet run {self.run_id}: {self.total} tasks, {self.wall_time:.1f} s")
        ax.legend(handles=[Patch(color=c, label=s) for s, c in colors.items()], loc="upper right", fontsize=7)
        fig.tight_layout()
        return _display.finish_figure(fig, path, dpi=110)
