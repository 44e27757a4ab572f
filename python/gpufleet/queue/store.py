"""The queue's SQLite database: jobs, their dependencies, their environments, the daemon's settings.

It is also the dispatcher's journal (runs, tasks, attempts: csrc/dispatch/journal.cpp), written by
the C++ run loop under the task key ``job-<id>``, so ``gpufleet journal`` reads a queue and a
restart knows every attempt that had started (Note [Queue recovery] in daemon.py). WAL mode, one
writer at a time, every change committed before it is acknowledged. Stdlib only (clients read a
stopped queue with it).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time

TYPE_CHECKING = False  # typing itself costs every `gpufleet submit` 6 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Iterable, Optional

FINAL = ("succeeded", "failed", "timed_out", "cancelled", "dependency_failed")
ACTIVE = ("queued", "running", "retrying")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, owner INTEGER NOT NULL, name TEXT, argv TEXT NOT NULL, shell INTEGER,
  cwd TEXT, env_id TEXT, outputs TEXT, gpus INTEGER, min_free_memory INTEGER, timeout REAL, retries INTEGER,
  priority INTEGER, state TEXT NOT NULL, cancel_requested INTEGER DEFAULT 0, attempts INTEGER DEFAULT 0,
  retries_used INTEGER DEFAULT 0, devices TEXT, node TEXT, pid INTEGER, submitted REAL, started REAL, ended REAL,
  exit_code INTEGER, signal INTEGER, message TEXT, log_path TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deps(job INTEGER NOT NULL, after INTEGER NOT NULL, PRIMARY KEY(job, after));
CREATE INDEX IF NOT EXISTS deps_by_after ON deps(after);
CREATE TABLE IF NOT EXISTS envs(id TEXT PRIMARY KEY, env TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
"""

_COLUMNS = ("id", "owner", "name", "argv", "shell", "cwd", "outputs", "gpus", "min_free_memory", "timeout", "retries",
            "priority", "state", "attempts", "devices", "node", "pid", "submitted", "started", "ended", "exit_code",
            "signal", "message", "log_path")


# backlog.py's row of a queued job
JOB_ROW = ("SELECT j.id, j.owner, j.name, j.argv, j.shell, j.cwd, e.env, j.outputs, j.gpus, j.min_free_memory, "
           "j.timeout, j.retries, j.retries_used, j.attempts, j.priority FROM jobs j LEFT JOIN envs e ON e.id=j.env_id")


def exit_status(state: str, exit_code: Optional[int], sig: Optional[int]) -> Optional[int]:
    """A job's exit status as ``gpufleet wait`` returns it (task-spooler's ``-w``): its own exit code,
    128 + N when signal N ended it, 124 when it timed out (as timeout(1)), 143 when cancelled (as a
    process ended by SIGTERM), 125 when it never ran because a dependency failed; None while active."""
    if state in ACTIVE:
        return None
    if state == "succeeded":
        return 0
    if state == "timed_out":
        return 124
    if state == "cancelled":
        return 143
    if state == "dependency_failed":
        return 125
    if sig:
        return 128 + sig
    return exit_code if exit_code is not None else 1


def dependency_message(parent: int, state: str) -> str:
    return f"not run: job {parent}, which it runs after, ended {state}"


def env_key(env: dict) -> tuple:
    import hashlib

    text = json.dumps(sorted(env.items()), separators=(",", ":"))
    return hashlib.sha1(text.encode("ascii")).hexdigest(), text


class Store:
    """One connection, shared by the daemon's threads under ``lock``."""

    def __init__(self, path: str, create: bool = True):
        import sqlite3  # here: clients that only list or submit never need it (Note [Lazy package])

        self.path = path
        self.lock = threading.RLock()
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        if create:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives the process (SIGKILL)
            self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self):
        """A write transaction (BEGIN IMMEDIATE: the writer lock is taken up front, so concurrent writers
        queue on SQLite's busy timeout instead of failing halfway)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ---- settings ---------------------------------------------------------------------------------

    def meta(self, key: str, default=None):
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, db, key: str, value) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES(?,?)", (key, json.dumps(value)))

    # ---- jobs ---------------------------------------------------------------------------------------

    def add_job(self, db, owner: int, job: dict, env: tuple) -> tuple:
        """Inserts a job (already validated) inside the caller's transaction; ``env`` is env_key()'s pair.
        Returns its row for the backlog (backlog.py's columns)."""
        eid, text = env
        db.execute("INSERT OR IGNORE INTO envs VALUES(?,?)", (eid, text))
        argv, outputs = json.dumps(job["argv"]), json.dumps(job["outputs"])
        cur = db.execute(
            "INSERT INTO jobs(owner,name,argv,shell,cwd,env_id,outputs,gpus,min_free_memory,timeout,retries,priority,"
            "state,submitted) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,'queued',?)",
            (owner, job["name"], argv, int(job["shell"]), job["cwd"], eid, outputs, job["gpus"],
             job["min_free_memory"], job["timeout"], job["retries"], job["priority"], time.time()))
        jid = cur.lastrowid
        if job["after"]:
            db.executemany("INSERT OR IGNORE INTO deps VALUES(?,?)", [(jid, a) for a in job["after"]])
        return (jid, owner, job["name"], argv, int(job["shell"]), job["cwd"], text, outputs, job["gpus"],
                job["min_free_memory"], job["timeout"], job["retries"], 0, 0, job["priority"])

    def states(self, db, ids: Iterable[int]) -> dict:
        """id -> state of those of ``ids`` that exist."""
        ids = list(ids)
        if not ids:
            return {}
        return dict(db.execute(f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids))

    def job_row(self, db, jid: int) -> tuple:
        """What the dispatcher's task needs of a queued job (backlog.py's columns)."""
        return db.execute(JOB_ROW + " WHERE j.id=?", (jid,)).fetchone()

    def pending_deps(self, db, jid: int) -> set:
        """The jobs ``jid`` runs after that have not succeeded yet."""
        return {a for (a,) in db.execute("SELECT d.after FROM deps d JOIN jobs p ON p.id=d.after WHERE d.job=? AND "
                                         "p.state!='succeeded'", (jid,))}

    def queued(self, db) -> list:
        """(row, pending dependencies) of every queued job, for the backlog of a daemon that starts."""
        pending: dict = {}
        for job, after in db.execute("SELECT d.job, d.after FROM deps d JOIN jobs j ON j.id=d.job JOIN jobs p ON "
                                     "p.id=d.after WHERE j.state='queued' AND p.state!='succeeded'"):
            pending.setdefault(job, set()).add(after)
        return [(r, pending.get(r[0], ())) for r in db.execute(JOB_ROW + " WHERE j.state='queued' ORDER BY j.id")]

    def fail_dependants(self, db, jid: int, now: float) -> list:
        """Every queued job that (transitively) waits for ``jid``, which ended without success, becomes
        dependency_failed with a message naming the job it waited for and how that ended (the message a
        job submitted after that end gets too). Returns their ids."""
        out, todo = [], [jid]
        while todo:
            parent = todo.pop()
            (state,) = db.execute("SELECT state FROM jobs WHERE id=?", (parent,)).fetchone()
            for (child,) in db.execute("SELECT d.job FROM deps d JOIN jobs j ON j.id=d.job WHERE d.after=? AND "
                                       "j.state='queued'", (parent,)).fetchall():
                db.execute("UPDATE jobs SET state='dependency_failed', ended=?, message=? WHERE id=?",
                           (now, dependency_message(parent, state), child))
                out.append(child)
                todo.append(child)
        return out

    def requeue_dependants(self, db, jid: int) -> list:
        """The reverse of fail_dependants for ``gpufleet retry``: dependants that failed because of ``jid``
        are queued again (their own dependencies are checked again when they become ready)."""
        out, todo = [], [jid]
        while todo:
            parent = todo.pop()
            for (child,) in db.execute("SELECT d.job FROM deps d JOIN jobs j ON j.id=d.job WHERE d.after=? AND "
                                       "j.state='dependency_failed'", (parent,)).fetchall():
                db.execute("UPDATE jobs SET state='queued', ended=NULL, message=NULL WHERE id=?", (child,))
                out.append(child)
                todo.append(child)
        return out

    def row(self, db, jid: int) -> Optional[dict]:
        r = db.execute(f"SELECT {','.join(_COLUMNS)}, cancel_requested FROM jobs WHERE id=?",
                       (jid,)).fetchone()
        return None if r is None else self._record(db, r)

    def records(self, ids: Optional[Iterable[int]] = None) -> list:
        """Jobs as dicts (the ``ls --json`` records), all of them or those of ``ids`` (in id order)."""
        with self.lock:
            db = self.db
            if ids is None:
                rows = db.execute(f"SELECT {','.join(_COLUMNS)}, cancel_requested FROM jobs ORDER BY id")
            else:
                ids = sorted(set(ids))
                rows = db.execute(f"SELECT {','.join(_COLUMNS)}, cancel_requested FROM jobs WHERE id IN "
                                  f"({','.join('?' * len(ids))}) ORDER BY id", ids)
            rows = rows.fetchall()
            deps: dict = {}
            for job, after in db.execute("SELECT job, after FROM deps ORDER BY job, after"):
                deps.setdefault(job, []).append(after)
        return [self._record(None, r, deps.get(r[0], [])) for r in rows]

    def _record(self, db, r, after=None) -> dict:
        rec = dict(zip(_COLUMNS, r))
        rec["cancel_requested"] = bool(r[-1])
        rec["argv"] = json.loads(rec["argv"])
        rec["outputs"] = json.loads(rec["outputs"] or "[]")
        rec["shell"] = bool(rec["shell"])
        rec["devices"] = json.loads(rec["devices"]) if rec["devices"] else []
        if after is None:
            after = [a for (a,) in db.execute("SELECT after FROM deps WHERE job=? ORDER BY after", (rec["id"],))]
        rec["after"] = after
        rec["exit_status"] = exit_status(rec["state"], rec["exit_code"], rec["signal"])
        return rec


def command_text(rec: dict) -> str:
    """A job's command as one line for people (shell-quoted argv, or the shell line)."""
    import shlex

    if rec.get("shell") and len(rec["argv"]) == 3:
        return rec["argv"][2]
    return " ".join(shlex.quote(a) for a in rec["argv"])


def read_stopped_queue(db_path: str) -> list:
    """The jobs of a queue whose daemon is not running (a private queue's owner reads its file)."""
    if not os.path.exists(db_path):
        return []
    store = Store(db_path, create=False)
    try:
        return store.records()
    finally:
        store.close()
