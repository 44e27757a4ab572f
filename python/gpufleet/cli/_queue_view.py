"""How queue records read on a terminal: the `gpufleet ls` table (also under `--watch`) and the rows of
`gpufleet top`. Stdlib only (Note [Lazy package])."""
from __future__ import annotations

import time

from ..queue.store import command_text

TYPE_CHECKING = False  # typing costs every queue command 4 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Optional

# The order jobs are listed in: what runs, what waits (in the order it will start), what ended.
_ORDER = {"running": 0, "retrying": 1, "queued": 2}


def sort_jobs(jobs: list) -> list:
    return sorted(jobs, key=lambda r: (_ORDER.get(r["state"], 3), -r["priority"] if r["state"] == "queued" else 0,
                                       r["id"] if r["state"] in _ORDER else -r["id"]))


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}h{(s % 3600) // 60:02d}"


def elapsed(rec: dict, now: float) -> Optional[float]:
    if rec["state"] == "running" and rec["started"]:
        return now - rec["started"]
    if rec["started"] and rec["ended"] and rec["state"] not in ("queued", "dependency_failed"):
        return rec["ended"] - rec["started"]
    return None


def exit_text(rec: dict) -> str:
    if rec["exit_status"] is None:
        return ""
    if rec["signal"] and rec["state"] not in ("timed_out", "cancelled"):
        return f"sig{rec['signal']}"
    return str(rec["exit_status"])


def row(rec: dict, now: float, with_user: bool) -> list:
    cells = [str(rec["id"]), rec["state"]]
    if with_user:
        cells.append(rec.get("user") or str(rec["owner"]))
    # where it ran (or runs); before that, what it asks for
    gpu = ",".join(rec["devices"]) or ("cpu" if rec["gpus"] == 0 else f"{rec['gpus']} GPU{'s' * (rec['gpus'] > 1)}")
    cells += [exit_text(rec), gpu, rec.get("node") or "", duration(elapsed(rec, now)),
              ",".join(map(str, rec["after"])), command_text(rec)]
    return cells


def header(with_user: bool) -> list:
    return ["ID", "STATE"] + (["USER"] if with_user else []) + ["EXIT", "GPU", "NODE", "TIME", "AFTER", "COMMAND"]


def table(jobs: list, queue: Optional[dict], width: int = 160) -> str:
    """The `gpufleet ls` table: a line per job (command cut to the width), its message under it when it
    did not succeed or waits for something, and the queue's recent messages."""
    now = time.time()
    with_user = bool(queue and queue.get("group"))
    rows = [header(with_user)] + [row(r, now, with_user) for r in sort_jobs(jobs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    recs = [None] + sort_jobs(jobs)
    for cells, rec in zip(rows, recs):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
        lines.append(line[:width].rstrip())
        if rec is not None and rec["message"] and rec["state"] != "succeeded":
            lines.append(("    " + rec["message"])[:width])
    if not jobs:
        lines.append("(no jobs)")
    if queue:
        counts = {}
        for r in jobs:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        lines.append("")
        lines.append(f"{queue_line(queue)}: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"))
        if not queue.get("pid") and (counts.get("running") or counts.get("retrying")):
            lines.append("  (the jobs shown running were interrupted: the next start of the queue runs them again)")
        lines += [f"  {m}" for m in queue.get("messages", [])[-3:]]
    return "\n".join(lines)


def queue_line(queue: dict) -> str:
    if not queue.get("pid"):
        return "queue not running"
    what = f"group queue {queue['group']}" if queue.get("group") else "queue"
    return (f"{what} on {queue['node']} (daemon pid {queue['pid']}, {', '.join(queue['devices']) or 'no GPU'}, "
            f"{queue['slots']} slot{'s' if queue['slots'] != 1 else ''} per GPU)")
