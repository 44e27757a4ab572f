"""The dispatcher's progress display (``gpufleet.run(progress=True)``, ``gpufleet run``), on the one
progress display of the package, ``_progress.Bar`` (Note [Progress modes])."""
from __future__ import annotations

import time
from typing import Callable, Optional

from . import _devices, _progress
from ._dispatch_report import device_label


class _Progress:
    """The dispatcher's display on ``_progress.Bar`` (Note [Progress modes]): a bar over the tasks to
    run, then one line per GPU with its running tasks and, when discovery knows them, its free memory
    and utilisation.

    Note [Progress counts]
    ~~~~~~~~~~~~~~~~~~~~~~
    The bar counts tasks that ran to an end (succeeded, failed, timed out, cancelled) against the
    total when the input is finite and known (``total=``; the CLI counts ``:::`` lists and files).
    Skipped tasks (resume, existing outputs) leave the total instead of filling the bar, so the rate
    and the ETA describe real work. Not started tasks (after a drain or a cancel) never fill it: a run
    drained after 137 of 200 tasks ends at 137/200 with "not started 63". Failed, cancelled and not
    started are separate counts, as in ``RunReport.counts`` and the summary.
    """

    def __init__(self, pool, slots: int, total: Optional[int], info: Optional[Callable[[], dict]] = None):
        self.pool = pool
        self.names = [device_label(d) for d in pool]
        # device name -> what discovery says of it now (free_memory, utilization); a cluster run passes
        # its nodes' last samples (cluster/_driver.py)
        self.read_info = info or (lambda: {f"cuda:{g.ordinal}": g for g in _devices.devices()})
        self.slots = slots
        self.total = total
        self.bar = _progress.Bar(total=total, desc="gpufleet", unit="task", status_lines=len(pool))
        self.last_info = 0.0
        self.info = {}

    def update(self, counts: dict, running: dict) -> None:
        c = counts
        ran = c["succeeded"] + c["failed"] + c["timed_out"] + c["cancelled"]
        if self.total is not None:
            self.bar.total = max(self.total - c["skipped"], ran)
        parts = [f"running {len(running)}", f"ok {c['succeeded']}", f"failed {c['failed'] + c['timed_out']}"]
        parts += [f"{label} {c[k]}" for k, label in (("cancelled", "cancelled"), ("not_started", "not started"),
                                                      ("skipped", "skipped")) if c[k]]
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.n = ran
        now = time.monotonic()
        if self.pool and now - self.last_info > 1.0:
            self.last_info = now
            try:
                self.info = self.read_info()
            except Exception:  # progress must never break a run
                self.info = {}
        for i, name in enumerate(self.names):
            mine = [r for r in running.values() if name in r[1]]
            g = self.info.get(name)
            extra = ""
            if g is not None and g.free_memory is not None:
                extra += f"  free {_devices.format_memory_size(g.free_memory)}"
            if g is not None and g.utilization is not None:
                extra += f"  util {g.utilization}%"
            names = ", ".join(r[0] for r in mine)[:60]
            self.bar.set_line(i, f"{name} [{len(mine)}/{self.slots}]{extra}  {names}")
        self.bar.refresh()

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
