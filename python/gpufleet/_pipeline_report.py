"""The report of a pipeline run: per-stage statistics, queues, errors, the limiting stage, the CPU
used, and how it shows itself (summary, HTML, Chrome trace, plot). Split from _pipeline.py, which runs
the stages and builds these objects; the public names are re-exported there."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from . import _display

__all__ = ["PipelineReport", "StageReport", "QueueReport", "ItemError"]


@dataclasses.dataclass
class ItemError:
    """One failed item: the stage, its position in the source (``index``), its id (``id=`` of the
    Pipeline, else the index), the exception, and with ``on_error="collect"`` the input it failed on."""

    stage: str
    index: int
    id: Any
    error: BaseException
    traceback: str
    item: Any = None

    def __str__(self) -> str:
        return f"stage '{self.stage}', item {self.id!r} (#{self.index}): {type(self.error).__name__}: {self.error}"


@dataclasses.dataclass
class StageReport:
    """Statistics of one stage. Times are summed over the stage's workers, so for every stage
    ``busy_s + starved_s + blocked_s == wall_s`` (the workers' summed wall time)."""

    name: str
    kind: str
    workers: int
    items_in: int
    items_out: int
    batches: int
    mean_batch_size: float
    busy_s: float
    starved_s: float
    blocked_s: float
    wall_s: float
    utilization: float
    errors: int
    devices: list = dataclasses.field(default_factory=list)
    note: str = ""
    workers_detail: list = dataclasses.field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Items out per second of the run (the stage's first start to its last finish)."""
        span = max((w["end_ns"] for w in self.workers_detail), default=0) - min(
            (w["start_ns"] for w in self.workers_detail), default=0)
        return self.items_out / (span * 1e-9) if span > 0 else 0.0


@dataclasses.dataclass
class QueueReport:
    name: str
    capacity: int
    high_water: int
    total_put: int


class PipelineReport:
    """What ``Pipeline.run()`` returns: per-stage statistics, the limiting stage, errors, results
    (when there is no sink), queue depths and throughput over time, GPU samples, and the CPU the
    process used (``cpu_s`` seconds over ``cores`` cores) and how busy the machine's CPUs were
    (``machine_busy``, 0..1, every process counted; None where /proc/stat is not there): Note
    [Saturated CPU]."""

    def __init__(self, *, stages, queues, wall_s, limiting_stage, errors, results, timeline, gpu_samples,
                 status, trace_stats, t0_ns, cpu_s: float = 0.0, cores: int = 1,
                 machine_busy: Optional[float] = None):
        self.stages: list[StageReport] = stages
        self.queues: list[QueueReport] = queues
        self.wall_s: float = wall_s
        self.limiting_stage: Optional[str] = limiting_stage
        self.errors: list[ItemError] = errors
        self.results: Optional[list] = results
        self.timeline: dict = timeline
        self.gpu_samples: list[dict] = gpu_samples
        self.status: str = status  # "completed", "failed" or "interrupted"
        self.cpu_s: float = cpu_s
        self.cores: int = cores
        self.machine_busy: Optional[float] = machine_busy
        self._trace_stats = trace_stats
        self._t0_ns = t0_ns

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def items(self) -> int:
        """Items the source produced."""
        return self.stages[0].items_out if self.stages else 0

    @property
    def cpu_utilization(self) -> float:
        """CPU time of this process during the run over the time its cores offered (0..1)."""
        return self.cpu_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    def _cpu_line(self) -> str:
        """Note [Saturated CPU]: a stage's busy time includes waiting for a core. When the cores are all
        busy (with this process's stages, or with other processes), each stage is slowed by the others,
        and the busiest one (the "limiting stage") is the one that needs the most CPU, not one with a
        cost of its own: say so."""
        line = f"process CPU {self.cpu_s / self.wall_s if self.wall_s > 0 else 0:.2f} of {self.cores} cores"
        if self.machine_busy is not None:
            line += f", machine CPUs {100 * self.machine_busy:.0f}% busy"
        if self.cpu_utilization >= 0.85 or (self.machine_busy is not None and self.machine_busy >= 0.9):
            line += (" (saturated: stages wait for cores, so busy% includes waiting for the CPU; more workers "
                     "will not help, less CPU work per item, fewer other processes or more cores will)")
        return line

    def summary(self) -> str:
        """A table: one line per stage, the limiting stage marked, GPU samples summarised."""
        lines = [f"pipeline {self.status} in {self.wall_s:.3f} s, {self.items} items, "
                 f"{len(self.errors)} errors; limiting stage: {self.limiting_stage or '-'}", self._cpu_line()]
        head = (f"{'stage':<22}{'workers':>7}{'items':>9}{'batches':>8}{'mean b':>7}{'busy%':>7}{'starved%':>9}"
                f"{'blocked%':>9}{'items/s':>10}")
        lines.append(head)
        for s in self.stages:
            w = s.wall_s if s.wall_s > 0 else 1.0
            tag = "  <- limiting" if s.name == self.limiting_stage else ""
            lines.append(
                f"{s.name[:21]:<22}{s.workers:>7}{s.items_out:>9}{s.batches:>8}{s.mean_batch_size:>7.1f}"
                f"{100 * s.busy_s / w:>7.1f}{100 * s.starved_s / w:>9.1f}{100 * s.blocked_s / w:>9.1f}"
                f"{s.throughput:>10.1f}{tag}")
            if s.note:
                lines.append(f"{'':<22}note: {s.note}")
            if s.devices:
                lines.append(f"{'':<22}devices: {', '.join(str(d) for d in s.devices)}")
        for q in self.queues:
            lines.append(f"queue {q.name}: capacity {q.capacity}, max depth {q.high_water}")
        if self.gpu_samples:
            by_dev: dict = {}
            for g in self.gpu_samples:
                by_dev.setdefault(g["device"], []).append(g)
            for dev, rows in by_dev.items():
                util = [r["utilization"] for r in rows if r["utilization"] is not None]
                mem = [r["used_memory"] for r in rows if r["used_memory"] is not None]
                u = f"{sum(util) / len(util):.0f}% mean, {max(util)}% max" if util else "n/a"
                mm = f"{max(mem) / 2**20:.0f} MiB max" if mem else "n/a"
                lines.append(f"GPU {dev} ({rows[0]['source']}): utilisation {u}; memory used {mm}; "
                             f"{len(rows)} samples")
        for e in self.errors[:5]:
            lines.append(f"error: {e}")
        if len(self.errors) > 5:
            lines.append(f"... and {len(self.errors) - 5} more errors")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PipelineReport(status={self.status!r}, items={self.items}, wall_s={self.wall_s:.3f}, "
                f"limiting_stage={self.limiting_stage!r}, errors={len(self.errors)})")

    def _repr_html_(self) -> str:
        """The summary as tables (Note [Rich display]): one row per stage, the limiting one marked."""
        title = (f"pipeline {self.status} in {self.wall_s:.3f} s, {self.items} items, {len(self.errors)} errors; "
                 f"limiting stage: {self.limiting_stage or '-'}")
        rows = []
        for s in self.stages:
            w = s.wall_s if s.wall_s > 0 else 1.0
            rows.append((s.name + (" (limiting)" if s.name == self.limiting_stage else ""), s.workers, s.items_out,
                         s.batches, f"{s.mean_batch_size:.1f}", f"{100 * s.busy_s / w:.1f}",
                         f"{100 * s.starved_s / w:.1f}", f"{100 * s.blocked_s / w:.1f}", f"{s.throughput:.1f}",
                         "; ".join(x for x in (s.note, ", ".join(str(d) for d in s.devices)) if x)))
        notes = [self._cpu_line()]
        notes += [f"queue {q.name}: capacity {q.capacity}, max depth {q.high_water}" for q in self.queues]
        notes += [f"error: {e}" for e in self.errors[:5]]
        if len(self.errors) > 5:
            notes.append(f"... and {len(self.errors) - 5} more errors")
        return _display.html_table(("stage", "workers", "items", "batches", "mean batch", "busy %", "starved %",
                                    "blocked %", "items/s", "notes"), rows, title=title, notes=notes,
                                   numeric=tuple(range(1, 9)))

    def to_chrome_trace(self, path: Optional[str] = None) -> dict:
        """The run as a Chrome trace (chrome://tracing, Perfetto): one track per worker with its
        busy / starved / blocked spans, and counters for every queue's depth. Written to ``path``
        as JSON when given."""
        events: list[dict] = []
        for pid_stage, st in enumerate(self._trace_stats):
            events.append({"ph": "M", "name": "process_name", "pid": pid_stage, "tid": 0,
                           "args": {"name": f"stage {st.name}"}})
            for w in range(st.workers):
                events.append({"ph": "M", "name": "thread_name", "pid": pid_stage, "tid": w,
                               "args": {"name": f"{st.name} worker {w}"}})
                for state, start, dur in st.clock(w).spans():
                    events.append({"ph": "X", "name": state, "cat": state, "pid": pid_stage, "tid": w,
                                   "ts": (start - self._t0_ns) / 1e3, "dur": dur / 1e3})
        times = self.timeline.get("t_s", [])
        for name, values in self.timeline.get("queues", {}).items():
            for t, v in zip(times, values):
                events.append({"ph": "C", "name": f"queue {name}", "pid": len(self._trace_stats), "tid": 0,
                               "ts": t * 1e6 + self.timeline.get("offset_us", 0.0), "args": {"depth": v}})
        trace = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w") as f:
                json.dump(trace, f)
        return trace

    def plot(self, path: Optional[str] = None) -> Any:
        """A figure with throughput (items/s) and queue depth over time per stage. Saved to ``path``
        (whose path is returned), or, without one, returned as a matplotlib ``Figure`` (shown inline
        in Jupyter). Needs the ``plot`` extra (matplotlib)."""
        fig = _display.new_figure("PipelineReport.plot", path, figsize=(9, 6))
        t = self.timeline.get("t_s", [])
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        # Rates over a sliding window of about a twentieth of the run (at least one sample period).
        win = max(1, len(t) // 20)
        for name, counts in self.timeline.get("items_out", {}).items():
            rate = [0.0] + [(counts[i] - counts[max(0, i - win)]) / max(t[i] - t[max(0, i - win)], 1e-9)
                            for i in range(1, len(t))]
            ax1.plot(t, rate, label=name + (" (limiting)" if name == self.limiting_stage else ""))
        ax1.set_ylabel("items/s")
        ax1.legend(fontsize="small")
        ax1.set_title(f"pipeline {self.status}: {self.items} items in {self.wall_s:.2f} s")
        for name, depth in self.timeline.get("queues", {}).items():
            ax2.step(t, depth, where="post", label=name)
        ax2.set_ylabel("queue depth")
        ax2.set_xlabel("time (s)")
        ax2.legend(fontsize="small")
        fig.tight_layout()
        return _display.finish_figure(fig, path)


def _machine_cpu() -> Optional[tuple[int, int]]:
    """(all, idle) CPU time of the machine in clock ticks, from the first line of /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: idle and iowait are the idle time
    return (sum(ticks[:8]), ticks[3] + ticks[4]) if len(ticks) >= 5 else None
