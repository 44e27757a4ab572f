"""`gpufleet journal PATH`: what a run's SQLite journal (``gpufleet run --journal``, ``gpufleet.run(
journal=...)``) holds: the runs, the tasks by state, and each failed task with the tail of its last
log. ``--json`` for scripts. The journal is opened read-only: reading it while a run writes is safe."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import urllib.parse
from typing import Optional

STATES = ("succeeded", "failed", "timed_out", "cancelled", "retrying", "running")


def register(sub) -> None:
    p = sub.add_parser("journal", help="show the runs, tasks and failures a run journal records",
                       description=__doc__)
    p.add_argument("path", help="the SQLite journal (--journal of gpufleet run)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="only the tasks whose last attempt was in this run")
    p.add_argument("--tail", type=int, default=10, metavar="N", help="lines of each failed task's log (default 10)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=main)


def _open(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise ValueError(f"no journal at {path!r}")
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)))}?mode=ro", uri=True)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path!r} is not a gpufleet journal (SQLite says: {e})") from None
    if not {"runs", "tasks", "attempts"} <= tables:
        db.close()
        raise ValueError(f"{path!r} is an SQLite file but not a gpufleet journal (no runs/tasks/attempts tables)")
    db.row_factory = sqlite3.Row
    return db


def _tail(path: Optional[str], n: int) -> Optional[str]:
    if not path or n <= 0:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"(cannot read the log: {e.strerror})"
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


def _loads(text: Optional[str]):
    try:
        return json.loads(text) if text else []
    except ValueError:
        return text


def journal_dict(path: str, run: Optional[str] = None, tail: int = 10) -> dict:
    db = _open(path)
    try:
        runs = []
        for r in db.execute("SELECT run_id, started, finished, status, description FROM runs ORDER BY started"):
            per = {row[0]: row[1] for row in db.execute(
                "SELECT status, COUNT(*) FROM attempts WHERE run_id=? GROUP BY status", (r["run_id"],))}
            runs.append({"run_id": r["run_id"], "started": r["started"], "finished": r["finished"],
                         "status": r["status"], "description": r["description"], "attempts": per})
        if run is not None and run not in {r["run_id"] for r in runs}:
            raise ValueError(f"--run {run!r}: the journal has no such run (runs: "
                             f"{', '.join(r['run_id'] for r in runs) or 'none'})")
        where, params = ("WHERE run_id=?", (run,)) if run is not None else ("", ())
        by_state = {row[0]: row[1] for row in db.execute(f"SELECT state, COUNT(*) FROM tasks {where} GROUP BY state",
                                                          params)}
        failed = []
        cond = "state IN ('failed', 'timed_out')" + (" AND run_id=?" if run is not None else "")
        for t in db.execute(f"SELECT * FROM tasks WHERE {cond} ORDER BY end", params):
            failed.append({"name": t["name"], "state": t["state"], "attempts": t["attempts"], "device": t["device"] or None,
                           "exit_code": t["exit_code"], "signal": t["signal"], "message": t["message"],
                           "start": t["start"], "end": t["end"], "run_id": t["run_id"], "argv": _loads(t["argv"]),
                           "outputs": _loads(t["outputs"]), "log_path": t["log_path"] or None,
                           "log_tail": _tail(t["log_path"], tail)})
    finally:
        db.close()
    return {"path": os.path.abspath(path), "runs": runs,
            "tasks": {"total": sum(by_state.values()), "by_state": by_state}, "failed": failed}


def _when(t: Optional[float]) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render(info: dict) -> str:
    runs, tasks = info["runs"], info["tasks"]
    lines = [f"journal {info['path']}: {len(runs)} run{'s' if len(runs) != 1 else ''}, {tasks['total']} "
             f"task{'s' if tasks['total'] != 1 else ''}"]
    if runs:
        header = ("run", "started", "finished", "status", "attempts", "command")
        rows = [(r["run_id"], _when(r["started"]), _when(r["finished"]), r["status"] or "?",
                 " ".join(f"{k} {v}" for k, v in sorted(r["attempts"].items())) or "none",
                 (r["description"] or "")[:60]) for r in runs]
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    by = tasks["by_state"]
    order = [s for s in STATES if s in by] + sorted(s for s in by if s not in STATES)
    lines.append("")
    lines.append("tasks by state: " + (", ".join(f"{s} {by[s]}" for s in order) or "none"))
    if by.get("running"):
        lines.append("  (running: started by a run that is still going, or that was killed before they ended; "
                     "--resume runs them again)")
    for f in info["failed"]:
        why = f["message"] or (f"exit status {f['exit_code']}" if f["exit_code"] is not None else "")
        where = f" on {f['device']}" if f["device"] else ""
        lines.append("")
        lines.append(f"{f['state'].upper().replace('_', ' ')} {f['name']!r}{where} after {f['attempts']} "
                     f"attempt{'s' if f['attempts'] != 1 else ''} (run {f['run_id']}): {why}")
        if f["log_path"]:
            lines.append(f"  log: {f['log_path']}")
        if f["log_tail"]:
            lines += [f"  | {ln}" for ln in f["log_tail"].splitlines()]
    return "\n".join(lines)


def main(args) -> int:
    try:
        info = journal_dict(args.path, args.run, args.tail)
    except ValueError as e:
        print(f"gpufleet journal: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(render(info))
    return 0
