"""What `gpufleet run` writes besides the dispatcher's own output: GNU parallel's ``--joblog`` and the
``--keep-order`` printer."""
from __future__ import annotations

import heapq
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Optional

from .._dispatch_template import JOB_SLOT_MARK

JOBLOG_HEADER = "\t".join(["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command"])


def command_line(task, job_slot: str = "1") -> str:
    """The task's command as one shell line (what parallel's joblog and --dry-run show), ``{%}``
    given as ``job_slot``."""
    from .._dispatch import _sub_outputs

    argv = [_sub_outputs(a, task.outputs).replace(JOB_SLOT_MARK, job_slot) for a in task.cmd]
    return argv[2] if task.shell else shlex.join(argv)


class JobLog:
    """GNU parallel's ``--joblog``: a header, then one line per task that ran, as it ends: ``Seq`` (the
    task number, ``{#}``), ``Host`` (``:``, this machine; on a cluster the task's node), ``Starttime`` (Unix time, 3 decimals),
    ``JobRuntime`` (seconds, ``%10.3f``), ``Send``/``Receive`` (0: no transfer), ``Exitval``
    (-1 for a timeout or a cancel, as parallel writes for a killed job), ``Signal`` and the
    ``Command`` (newlines written as NUL, as parallel does). With retries, the last attempt."""

    def __init__(self, path: str, pool_size_slots: tuple[list[str], int] = ([], 1)):
        self.path = path
        try:
            self.f = sys.stdout.buffer if path == "-" else open(path, "wb")
        except OSError as e:
            raise ValueError(f"cannot write the --joblog {path!r}: {e.strerror}") from None
        self.devices, self.slots = pool_size_slots
        self.tasks: dict = {}
        self._write(JOBLOG_HEADER)

    def _write(self, line: str) -> None:
        self.f.write(line.encode("utf-8", "surrogateescape") + b"\n")
        self.f.flush()

    def track(self, tasks):
        """Passes the tasks through, remembering each one until it ends."""
        for seq, t in enumerate(tasks):
            self.tasks[seq] = t
            yield t

    def _job_slot(self, rec) -> str:
        if rec.devices and rec.devices[0] in self.devices:
            return str(1 + self.devices.index(rec.devices[0]) * self.slots + (rec.slot or 0))
        return str(1 + (rec.slot or 0))

    def finished(self, rec) -> None:
        task = self.tasks.pop(rec.seq, None)
        if task is None or rec.status in ("skipped", "not_started"):
            return
        start = rec.start if rec.start is not None else time.time()
        runtime = (rec.end - rec.start) if rec.start is not None and rec.end is not None else 0.0
        if rec.exit_code is not None:
            exitval = rec.exit_code
        else:
            exitval = -1 if rec.status in ("timed_out", "cancelled") else 0
        cmd = command_line(task, self._job_slot(rec)).replace("\n", "\0")
        self._write("\t".join([str(rec.number), rec.node or ":", f"{start:.3f}", f"{runtime:10.3f}", "0", "0",
                               str(exitval), str(rec.signal or 0), cmd]))

    def close(self) -> None:
        if self.f is not sys.stdout.buffer:
            self.f.close()


class KeepOrder:
    """``--keep-order``: tasks write log files, and each task's output is printed with the same
    ``[name] `` prefix as the live output, once it ended and every task before it was printed. With
    retries, the last attempt's output, as parallel prints it (every attempt's file stays in
    ``--log-dir`` when one is given). Without ``--log-dir`` the files live in a temporary folder that
    is removed at the end (their content was printed)."""

    def __init__(self, log_dir: Optional[str]):
        self.temporary = log_dir is None
        self.log_dir = tempfile.mkdtemp(prefix="gpufleet-keep-order-") if log_dir is None else log_dir
        self.next = 0
        self.pending: list = []
        self.out = sys.stdout.buffer

    def finished(self, rec) -> None:
        heapq.heappush(self.pending, (rec.seq, id(rec), rec))
        while self.pending and self.pending[0][0] <= self.next:
            _, _, r = heapq.heappop(self.pending)
            self._print(r)
            self.next = r.seq + 1

    def _print(self, rec) -> None:
        if not rec.log_path:
            return
        try:
            with open(rec.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return
        prefix = f"[{rec.name}] ".encode("utf-8", "surrogateescape")
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        self.out.write(b"".join(prefix + ln + b"\n" for ln in lines))
        self.out.flush()

    def close(self, report=None) -> None:
        while self.pending:
            self._print(heapq.heappop(self.pending)[2])
        if self.temporary:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            if report is not None:
                root = os.path.join(self.log_dir, "")
                for t in report.tasks:
                    if t.log_path and t.log_path.startswith(root):
                        t.log_path = None
