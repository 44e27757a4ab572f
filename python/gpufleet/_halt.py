"""GNU parallel's ``--halt`` for the dispatcher (``gpufleet.run(halt=...)``, ``gpufleet run --halt``):
when to stop a run, and the exit status parallel gives it (its ``should_we_halt`` and ``halt``).

``never``; ``when,why=N`` or ``when,why=P%`` with ``when`` in ``now`` (cancel: running tasks get the
kill sequence) or ``soon`` (drain: they finish, nothing new starts) and ``why`` in ``fail``,
``success`` or ``done``; the old forms ``0`` (never), ``1`` (soon,fail=1), ``2`` (now,fail=1), ``-1``
(soon,success=1), ``-2`` (now,success=1) and ``P%`` (soon,fail=P%).

Only tasks that ran count (skipped and not started ones never ran). The exit status, once halted:
``fail``/``done`` with ``=1``: the failing task's exit status (signal + 128 when a signal ended it);
with ``=N``: the number of failed tasks, at most 101; with ``=P%``: the percentage of all the tasks
that failed, rounded up; ``success``: 0. A run whose condition is never reached exits with the
number of failed tasks (at most 101), or for a percentage with the percentage of the tasks that ran
which failed. The decision is taken after each task ends and before the next starts (the
dispatcher hands its events over at once when there is a halt condition), so ``-j 1`` stops exactly
where parallel stops.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

_OLD_FORMS = {"0": "never", "1": "soon,fail=1", "2": "now,fail=1", "-1": "soon,success=1", "-2": "now,success=1"}
ACCEPTED = "never, now|soon,fail|success|done=N or =P% (e.g. now,fail=1, soon,fail=10%), or 0, 1, 2, -1, -2, P%"


@dataclass
class Halt:
    spec: str
    when: str                 # "now" or "soon"
    why: str                  # "fail", "success" or "done"
    count: Optional[int]
    pct: Optional[float]
    failed: int = 0
    succeeded: int = 0
    exit_status: Optional[int] = None

    @classmethod
    def parse(cls, spec: Optional[str]) -> Optional["Halt"]:
        """None for ``never`` (or None); ValueError naming the value and the accepted forms."""
        if spec is None:
            return None
        if not isinstance(spec, str):
            raise TypeError(f"halt must be a string such as 'now,fail=1', got {spec!r}")
        text = _OLD_FORMS.get(spec.strip(), spec.strip())
        text = re.sub(r"^(\d+)%$", r"soon,fail=\1%", text)
        if text == "never":
            return None
        m = re.fullmatch(r"(now|soon),(fail|success|done)=(\d+)(%?)", text)
        if not m or int(m.group(3)) == 0 or (m.group(4) and int(m.group(3)) > 100):
            raise ValueError(f"--halt {spec!r} is not understood; accepted: {ACCEPTED} (N >= 1, P from 1 to 100)")
        n = int(m.group(3))
        return cls(spec, m.group(1), m.group(2), None if m.group(4) else n, n / 100 if m.group(4) else None)

    def update(self, rec, total: Optional[int]) -> Optional[str]:
        """Counts one finished task (a ``TaskRecord``); returns ``"now"``/``"soon"`` when the run must stop."""
        if rec.status not in ("succeeded", "failed", "timed_out", "cancelled"):
            return None
        failed = rec.status != "succeeded"
        self.failed += failed
        self.succeeded += not failed
        if self.why == "fail":
            if not failed:
                return None
            reached = self.failed
        elif self.why == "success":
            if failed:
                return None
            reached = self.succeeded
        else:
            reached = self.failed + self.succeeded
        needed = self.count if self.count is not None else (total or 0) * self.pct
        if reached < needed:
            return None
        if self.why == "success":
            self.exit_status = 0
        elif self.pct is not None:
            self.exit_status = math.ceil(self.failed / max(total or 1, 1) * 100)
        elif self.count == 1:
            self.exit_status = rec.exit_code or (rec.signal + 128 if rec.signal else 0)
        else:
            self.exit_status = min(self.failed, 101)
        return self.when

    def final_exit_status(self) -> int:
        """The exit status of a run whose halt condition was never reached (parallel's ``halt()``):
        the percentage of the tasks that ran which failed, for a percentage; else the failures, at
        most 101."""
        if self.pct is not None:
            return math.ceil(self.failed / max(self.failed + self.succeeded, 1) * 100)
        return min(self.failed, 101)

    def describe(self, rec) -> str:
        action = ("running tasks cancelled (kill sequence)" if self.when == "now"
                  else "running tasks finished, nothing new started")
        return f"--halt {self.spec} reached at task #{rec.number} ({rec.status}): {action}"
