"""The queue daemon's dispatcher: one long-lived C++ run (Note [Open input] in
csrc/dispatch/scheduler.cpp) whose pull hands over the ready jobs of the backlog and whose events move
them through the database; and what a restart does with the jobs an earlier daemon had running.
"""
from __future__ import annotations

import json
import os
import queue as _queue
import shlex
import signal
import socket
import sqlite3
import sys
import threading
import time

from .. import _core, _dispatch
from . import runas
from .backlog import ID, Backlog
from .store import FINAL, Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

HOSTNAME = socket.gethostname()

# Note [Queue throughput]
# ~~~~~~~~~~~~~~~~~~~~~~~
# The dispatcher's thread must not wait: every job it starts goes through its pull and its events,
# and they run Python (they take the GIL). A pull that queried SQLite released and took the GIL
# again at every statement and every row, and behind four threads busy with submits each of those
# handoffs cost up to a switch interval (5 ms): 300 jobs/s where the dispatcher does 2,000. So:
# - the pull takes jobs from the backlog (backlog.py), in memory, one lock, no I/O;
# - the events go to a writer thread, which commits each batch in one transaction and only then wakes
#   the requests that wait (wait, cancel) and tells the dispatcher about jobs that became ready;
# - the journal (the C++ loop's own SQLite connection) is its own file, journal.sqlite beside
#   queue.sqlite: two connections writing one file wait for each other's locks in milliseconds.
# The order of changes stays what the database says: a submit is committed before its id is
# printed; a job's start and end are committed by the journal before the dispatcher reports them.

# Note [Queue recovery]
# ~~~~~~~~~~~~~~~~~~~~~
# The queue's database is the truth about jobs, the journal about attempts (the C++ loop commits a
# start and an end before it reports them). A daemon SIGKILLed at any instant leaves:
# - its tasks: its supervisor sees the daemon's end and runs the kill sequence on them (Note [No
#   process outlives the dispatcher]). The next daemon takes the lock (one daemon per queue: flock,
#   released by the kernel when the holder dies), then waits until no process carries the old run's
#   marker (saved in the database when the run began), SIGKILLing any left after the grace. Only then
#   does it start jobs, so a job never runs twice at once;
# - jobs whose journal row says more than the queue knows: an attempt the queue does not know of (a
#   higher attempt number), or the end of the one it shows running. "running": the attempt was
#   interrupted; it is recorded in the journal's attempts table as "interrupted" and the job is queued
#   again, its next attempt numbered after it (unless it declared outputs renamed into place after the
#   attempt started: then it had succeeded, as Note [Re-runs after a crash] lets `run --resume` see);
#   "retrying": queued again; a final state: applied (the daemon died between the journal's commit
#   and its own). A job queued with nothing newer in the journal stays queued;
# - retries spent count against --retries; an interrupted attempt does not (the job did not fail). A
#   job whose process had exited just before the kill, unknown to the journal, runs again: queued
#   jobs, like `run`'s tasks, must be idempotent or declare outputs.


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _wait_marked_gone(marker: str, grace: float, log: Callable[[str], None]) -> None:
    if not marker or _core.kill_marked_processes(marker, 0) == 0:
        return
    log("waiting for the processes of the previous daemon's run to end (its supervisor stops them)")
    end = time.monotonic() + grace + 5.0
    while time.monotonic() < end and _core.kill_marked_processes(marker, 0):
        time.sleep(0.05)
    if _core.kill_marked_processes(marker, signal.SIGKILL):
        log("SIGKILLed the processes of the previous run that were still there")
        end = time.monotonic() + 10.0
        while time.monotonic() < end and _core.kill_marked_processes(marker, 0):
            time.sleep(0.05)


def _outputs_renamed_since(outputs: list, start: float) -> bool:
    if not outputs:
        return False
    try:
        return all(os.stat(o).st_mtime >= start - 0.05 for o in outputs)
    except OSError:
        return False


def recover(store: Store, journal_path: str, grace: float, log: Callable[[str], None]) -> dict:
    """Note [Queue recovery]. Returns counts: requeued, interrupted, finished."""
    _wait_marked_gone(store.meta("marker", ""), grace, log)
    now = time.time()
    counts = {"requeued": 0, "interrupted": 0, "finished": 0}
    journal = sqlite3.connect(journal_path, timeout=30, isolation_level=None)
    try:
        tasks = {k: r for k, *r in journal.execute(
            "SELECT key, state, attempts, exit_code, signal, start, end, message, log_path, device, run_id FROM tasks "
            "WHERE key LIKE 'job-%'")}
        journal.execute("BEGIN IMMEDIATE")
        with store.tx() as db:
            for jid, state, known, used, cancel_req, outputs in db.execute(
                    "SELECT id, state, attempts, retries_used, cancel_requested, outputs FROM jobs WHERE state IN "
                    "('queued','running','retrying')").fetchall():
                t = tasks.get(f"job-{jid}")
                if t is None or t[1] < known or (t[1] == known and state == "queued"):
                    if state != "queued":  # nothing newer: it never really started
                        db.execute("UPDATE jobs SET state='queued', pid=NULL WHERE id=?", (jid,))
                        counts["requeued"] += 1
                    continue
                what = _recover_job(db, journal, store, jid, t, known, used, cancel_req, outputs, now)
                counts[what] += 1
                if what == "interrupted":
                    counts["requeued"] += 1
        journal.execute("COMMIT")
    finally:
        journal.close()
    return counts


def _recover_job(db, journal, store: Store, jid: int, t: tuple, known: int, used: int, cancel_req: int,
                 outputs: str, now: float) -> str:
    jstate, attempt, code, sig, start, end, message, log_path, device, run_id = t
    key = f"job-{jid}"
    if jstate == "running" and _outputs_renamed_since(json.loads(outputs or "[]"), start or now):
        jstate, code = "succeeded", 0
        message = "succeeded (its outputs were renamed into place) as the daemon ended"
    if jstate in FINAL and not (jstate == "cancelled" and not cancel_req):
        db.execute("UPDATE jobs SET state=?, attempts=?, exit_code=?, signal=?, ended=?, message=?, log_path=?, "
                   "pid=NULL WHERE id=?", (jstate, attempt, code, sig, end or now, message, log_path, jid))
        if jstate != "succeeded":
            store.fail_dependants(db, jid, now)
        return "finished"
    if jstate == "running":
        why = f"attempt {attempt} was interrupted: the queue daemon ended while it ran; queued again"
        journal.execute("INSERT INTO attempts VALUES(?,?,?,NULL,?,?,'interrupted',NULL,NULL,?,?)",
                        (key, attempt, device, start, now, why, run_id))
        journal.execute("UPDATE tasks SET state='interrupted', end=?, message=? WHERE key=?", (now, why, key))
        what = "interrupted"
    else:  # retrying, or stopped by the queue's stop
        why = f"attempt {attempt} ended ({jstate}) as the daemon ended; queued again"
        used += max(0, attempt - known) if jstate == "retrying" else 0
        what = "requeued"
    db.execute("UPDATE jobs SET state='queued', attempts=?, retries_used=?, pid=NULL, message=? WHERE id=?",
               (attempt, used, why, jid))
    return what


class Runner:
    """The dispatcher of one daemon's life, and the glue between it, the backlog and the database."""

    def __init__(self, store: Store, backlog: Backlog, ordinals: list, settings: dict, logs: str, journal: str,
                 run_as_owners: bool, changed: Callable[[], None], log: Callable[[str], None]):
        self.store, self.backlog, self.settings, self.changed, self.log = store, backlog, settings, changed, log
        self.journal_path = journal
        self.run_as_owners = run_as_owners
        self.uid = os.geteuid()
        self.pool = _core.make_pool(ordinals)
        self.names = [f"cuda:{d.ordinal}" for d in self.pool]
        slots, cpu_slots = int(settings["slots"]), int(settings["cpu_slots"] or 0)
        total = len(self.pool) * slots + (cpu_slots or max(1, len(self.pool) * slots))
        self.messages: list = []
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.events: _queue.SimpleQueue = _queue.SimpleQueue()
        self.interrupted: list = []  # (key, attempt, why) of the attempts a stop ended: journal rows
        self.envs: dict = {}         # env text -> dict (submissions from one shell share one)
        # Jobs are handed over for free slots only (Note [Open input]); the lookahead bounds those that wait
        # there for memory. Log files per attempt, the journal beside the queue, events every 20 ms.
        self.d = _core.Dispatcher(
            ordinals, slots, cpu_slots, int(settings["quarantine_after"]), float(settings["kill_grace"]), 1.0,
            "files", os.fsencode(logs), os.fsencode(journal), False, False, 2 * total + 2, 0.5, 0.02,
            b"gpufleet queue daemon", self._pull, self._on_events, -1, None, keep_open=True)
        with store.tx() as db:
            store.set_meta(db, "marker", self.d.marker)
            store.set_meta(db, "run_id", self.d.run_id)
        self.thread = threading.Thread(target=self._run, name="gpufleet-queue-dispatcher", daemon=True)
        self.writer = threading.Thread(target=self._write, name="gpufleet-queue-writer", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.thread.start()

    def _run(self) -> None:
        try:
            self.d.run()
        except BaseException as e:  # the daemon ends; Note [Queue recovery] takes over at its next start
            self.error = e
            self.log(f"the dispatcher failed: {type(e).__name__}: {e}")
        finally:
            self.events.put(None)
            self.writer.join()
            self._record_interrupted()
            self.changed()

    def _record_interrupted(self) -> None:
        if not self.interrupted:
            return
        journal = sqlite3.connect(self.journal_path, timeout=30)
        try:
            with journal:
                journal.executemany("UPDATE attempts SET status='interrupted', message=? WHERE key=? AND attempt=?",
                                    [(why, key, attempt) for key, attempt, why in self.interrupted])
        finally:
            journal.close()

    def note(self, text: str) -> None:
        self.messages = (self.messages + [f"{time.strftime('%H:%M:%S')} {text}"])[-20:]
        self.log(text)

    # ---- pull: the ready jobs as tasks (Note [Queue throughput]: no I/O here) ----------------------------

    def _pull(self, n: int) -> list:
        if self.stopping:
            return []
        specs = []
        for row in self.backlog.take(n, *self.d.free_slots()):
            try:
                specs.append(self._spec(row))
            except (ValueError, TypeError, OSError) as e:  # cannot happen for a job checked at submit
                self.events.put([("unstartable", row[ID], f"could not be started: {e}")])
        return specs

    def _spec(self, row):
        jid, owner, name, argv, shell, cwd, env_text, outputs, gpus, mfm, timeout, retries, used, attempts, _ = row
        argv, outputs = json.loads(argv), json.loads(outputs or "[]")
        base = self.envs.get(env_text)
        if base is None:
            base = self.envs[env_text] = dict(json.loads(env_text)) if env_text else {}
        env = dict(base, GPUFLEET_JOB_ID=str(jid))
        temps = [_dispatch._temp_name(o, "") for o in outputs]
        if shell:  # the shell line gets the temporary names quoted, as `run --shell` does
            argv = argv[:2] + [_dispatch._sub_outputs(argv[2], [shlex.quote(t) for t in temps])]
        else:
            argv = [_dispatch._sub_outputs(a, temps) for a in argv]
        if self.run_as_owners and owner != self.uid:  # Note [Who may use a queue]
            argv = [sys.executable, "-I", runas.__file__, str(owner), cwd or "/", "--", *argv]
            env, cwd = {runas.ENV_VAR: json.dumps(env)}, "/"
        fs = os.fsencode
        return _core.TaskSpec(jid - 1, f"job-{jid}", fs(name or ""), [fs(a) for a in argv],
                              [(fs(k), fs(v)) for k, v in env.items()], fs(cwd or ""),
                              [(fs(o), fs(t)) for o, t in zip(outputs, temps)], gpus, mfm or 0, timeout or 0.0,
                              max(0, retries - used), -1, attempts + 1)

    # ---- events: the jobs' progress into the database, on the writer thread ------------------------------

    def _on_events(self, events) -> None:
        self.events.put(list(events))

    def _write(self) -> None:
        while True:
            batch = self.events.get()
            if batch is None:
                return
            more = False
            while True:  # what came meanwhile joins this transaction
                try:
                    nxt = self.events.get_nowait()
                except _queue.Empty:
                    break
                if nxt is None:
                    self.events.put(None)
                    break
                batch += nxt
            try:
                with self.store.tx() as db:
                    for ev in batch:
                        more |= self._apply(db, ev, time.time())
            except Exception as e:  # a full disk: the jobs' records lag, the journal still has them
                self.log(f"could not record events: {type(e).__name__}: {e}")
            if more:
                self.d.notify_input()
            self.changed()

    def _apply(self, db, ev, now: float) -> bool:
        """One event into the database; whether jobs became ready."""
        if isinstance(ev, tuple):  # ("unstartable", id, message)
            db.execute("UPDATE jobs SET state='failed', ended=?, message=? WHERE id=?", (now, ev[2], ev[1]))
            self.backlog.ended(ev[1])
            self.backlog.drop(self.store.fail_dependants(db, ev[1], now))
            return False
        kind = ev.kind
        if kind == "message":
            self.note(ev.message)
            return False
        jid = ev.seq + 1
        if kind == "started":
            db.execute("UPDATE jobs SET state='running', attempts=?, devices=?, node=?, pid=?, started=?, ended=NULL, "
                       "log_path=?, message=NULL WHERE id=?",
                       (ev.attempt, json.dumps([self.names[i] for i in ev.devices]), HOSTNAME, ev.pid or None,
                        ev.start, ev.log_path or None, jid))
        elif kind == "not_started":  # stopped before it started: it stays queued for the next daemon
            db.execute("UPDATE jobs SET state='queued' WHERE id=? AND state IN ('queued','retrying')", (jid,))
            self.backlog.ended(jid)
        elif kind == "finished":
            return self._finished(db, ev, jid, now)
        return False

    def _finished(self, db, ev, jid: int, now: float) -> bool:
        cancel_req, used = db.execute("SELECT cancel_requested, retries_used FROM jobs WHERE id=?", (jid,)).fetchone()
        if not ev.final:
            why = f"attempt {ev.attempt} {ev.status}: {ev.message}; retrying"
            db.execute("UPDATE jobs SET state='retrying', pid=NULL, ended=?, exit_code=?, signal=?, retries_used=?, "
                       "message=? WHERE id=?", (ev.end, ev.exit_code, ev.signal, used + 1, why, jid))
            return False
        self.backlog.ended(jid)
        if ev.status == "cancelled" and not cancel_req:  # the queue stopped; the job did nothing wrong
            why = f"attempt {ev.attempt} was interrupted: the queue stopped; queued again"
            if ev.attempt:
                self.interrupted.append((f"job-{jid}", ev.attempt, why))
            db.execute("UPDATE jobs SET state='queued', pid=NULL, message=? WHERE id=?",
                       (why if ev.attempt else None, jid))
            return False
        message = ev.message if ev.status != "succeeded" else None
        if ev.status == "cancelled":
            message = f"cancelled by {_user(cancel_req - 1)}" + (" while it ran" if ev.pid else " before it started")
        db.execute("UPDATE jobs SET state=?, pid=NULL, ended=?, exit_code=?, signal=?, message=?, "
                   "log_path=COALESCE(?, log_path) WHERE id=?",
                   (ev.status, ev.end or now, ev.exit_code, ev.signal, message, ev.log_path or None, jid))
        if ev.status == "succeeded":
            return self.backlog.succeeded(jid)
        self.backlog.drop(self.store.fail_dependants(db, jid, now))
        return False

    # ---- control ------------------------------------------------------------------------------------

    def stop(self, drain: bool) -> None:
        """Drain: running jobs finish, nothing new starts. Otherwise the kill sequence on every running job
        (they are queued again, Note [Queue recovery]). Jobs not started stay queued either way."""
        self.stopping = True
        (self.d.drain if drain else self.d.cancel)()


def load_backlog(store: Store) -> Backlog:
    backlog = Backlog()
    with store.lock:
        for row, pending in store.queued(store.db):
            backlog.add(row, pending)
    return backlog

