"""The queue daemon's dispatcher: one long-lived C++ run (Note [Open input] in
csrc/dispatch/scheduler.cpp) whose pull hands over the jobs that are ready and whose events move
them through the database; and what a restart does with the jobs an earlier daemon had handed over.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from .. import _core, _dispatch
from . import runas
from .store import FINAL, Store

HOSTNAME = socket.gethostname()

# Note [Queue recovery]
# ~~~~~~~~~~~~~~~~~~~~~
# The database is the truth about jobs; the journal tables beside it (written by the C++ loop before
# it reports an event) are the truth about attempts. A daemon SIGKILLed at any instant leaves:
# - its tasks: its supervisor sees the daemon's end and runs the kill sequence on them (Note [No
#   process outlives the dispatcher]). The next daemon takes the lock (only one daemon per database:
#   flock, released by the kernel when the holder dies), then waits until no process carries the old
#   run's marker (saved in the database when the run began), SIGKILLing any left after the grace.
#   Only then does it hand out jobs, so a job never runs twice at once;
# - jobs marked as handed to the dispatcher (hand_attempt = the number their next attempt had). For
#   each, the journal row of that job, if written for an attempt >= hand_attempt, says how far it got:
#   "running": the attempt was interrupted; it is recorded in the journal's attempts table with the
#   status "interrupted" and the job is queued again, its next attempt numbered after it (unless it
#   declared outputs that were renamed into place after the attempt started: then it had succeeded,
#   as Note [Re-runs after a crash] lets `run --resume` conclude); "retrying": queued again;
#   a final state: applied (the daemon died between the journal's commit and its own);
#   no row for this episode: it never started, it is simply queued again;
# - retries already spent in an episode count against the job's --retries; an interrupted attempt does
#   not (the job did not fail). A job whose process had exited just before the kill, without the
#   journal knowing, runs again: queued jobs, like `run`'s tasks, must be idempotent or declare outputs.


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _wait_marked_gone(marker: str, grace: float, log: Callable[[str], None]) -> None:
    if not marker or _core.kill_marked_processes(marker, 0) == 0:
        return
    log(f"waiting for the processes of the previous daemon's run to end (its supervisor stops them)")
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


def recover(store: Store, grace: float, log: Callable[[str], None]) -> dict:
    """Note [Queue recovery]. Returns counts: requeued, interrupted, finished."""
    _wait_marked_gone(store.meta("marker", ""), grace, log)
    now = time.time()
    counts = {"requeued": 0, "interrupted": 0, "finished": 0}
    with store.tx() as db:
        rows = db.execute("SELECT id, state, hand_attempt, attempts, retries_used, cancel_requested, outputs FROM jobs "
                          "WHERE handed=1 OR state IN ('running','retrying')").fetchall()
        for jid, state, hand, attempts, used, cancel_req, outputs in rows:
            key = f"job-{jid}"
            t = db.execute("SELECT state, attempts, exit_code, signal, start, end, message, log_path, device, run_id "
                           "FROM tasks WHERE key=?", (key,)).fetchone()
            if t is None or t[1] < (hand or 1):
                db.execute("UPDATE jobs SET state='queued', handed=0 WHERE id=?", (jid,))
                counts["requeued"] += 1
                continue
            jstate, jattempt, code, sig, start, end, message, log_path, device, run_id = t
            if jstate == "running" and _outputs_renamed_since(json.loads(outputs or "[]"), start or now):
                jstate, code = "succeeded", 0
                message = "succeeded (its outputs were renamed into place) as the daemon ended"
            if jstate in FINAL and not (jstate == "cancelled" and not cancel_req):
                db.execute("UPDATE jobs SET state=?, handed=0, attempts=?, exit_code=?, signal=?, ended=?, message=?, "
                           "log_path=? WHERE id=?", (jstate, jattempt, code, sig, end or now, message, log_path, jid))
                if jstate != "succeeded":
                    store.fail_dependants(db, jid, now)
                counts["finished"] += 1
                continue
            failed = jattempt - hand + (1 if jstate == "retrying" else 0)
            why = (f"attempt {jattempt} was interrupted: the queue daemon ended while it ran; queued again"
                   if jstate != "retrying" else f"attempt {jattempt} failed and the daemon ended before its retry")
            if jstate != "retrying":
                db.execute("INSERT INTO attempts VALUES(?,?,?,NULL,?,?,'interrupted',NULL,NULL,?,?)",
                           (key, jattempt, device, start, now, why, run_id))
                db.execute("UPDATE tasks SET state='interrupted', end=?, message=? WHERE key=?", (now, why, key))
                counts["interrupted"] += 1
            db.execute("UPDATE jobs SET state='queued', handed=0, attempts=?, retries_used=?, pid=NULL, message=? "
                       "WHERE id=?", (jattempt, used + max(0, failed), why, jid))
            counts["requeued"] += 1
    return counts


class Runner:
    """The dispatcher of one daemon's life, and the glue between it and the database."""

    def __init__(self, store: Store, ordinals: list, settings: dict, logs: str, run_as_owners: bool,
                 changed: Callable[[], None], log: Callable[[str], None]):
        self.store, self.settings, self.changed, self.log = store, settings, changed, log
        self.run_as_owners = run_as_owners
        self.uid = os.geteuid()
        self.pool = _core.make_pool(ordinals)
        self.names = [f"cuda:{d.ordinal}" for d in self.pool]
        slots, cpu_slots = int(settings["slots"]), int(settings["cpu_slots"] or 0)
        total = len(self.pool) * slots + (cpu_slots or max(1, len(self.pool) * slots))
        self.messages: list = []
        self.stopping = False
        self.error: Optional[BaseException] = None
        # Jobs are handed over for free slots only (Note [Open input]); the lookahead bounds those that wait
        # there for memory. Log files per attempt, the journal in the queue's database, events every 20 ms.
        self.d = _core.Dispatcher(
            ordinals, slots, cpu_slots, int(settings["quarantine_after"]), float(settings["kill_grace"]), 1.0,
            "files", os.fsencode(logs), os.fsencode(store.path), False, False, 2 * total + 2, 0.5, 0.02,
            b"gpufleet queue daemon", self._pull, self._on_events, -1, None, keep_open=True)
        with store.tx() as db:
            store.set_meta(db, "marker", self.d.marker)
            store.set_meta(db, "run_id", self.d.run_id)
        self.thread = threading.Thread(target=self._run, name="gpufleet-queue-dispatcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.d.run()
        except BaseException as e:  # the daemon ends; Note [Queue recovery] takes over at its next start
            self.error = e
            self.log(f"the dispatcher failed: {type(e).__name__}: {e}")
        finally:
            self.changed()

    def note(self, text: str) -> None:
        self.messages = (self.messages + [f"{time.strftime('%H:%M:%S')} {text}"])[-20:]
        self.log(text)

    # ---- pull: the ready jobs as tasks ------------------------------------------------------------

    def _pull(self, n: int) -> list:
        if self.stopping:
            return []
        free = self.d.free_slots()  # Note [Open input]: hand over what fits the free slots, in priority order
        if not any(free):
            return []
        specs = []
        with self.store.tx() as db:
            for row in self.store.take_ready(db, n, *free):
                try:
                    spec = self._spec(row)
                except (ValueError, TypeError, OSError) as e:  # cannot happen for a job checked at submit
                    db.execute("UPDATE jobs SET state='failed', handed=0, ended=?, message=? WHERE id=?",
                               (time.time(), f"could not be started: {e}", row[0]))
                    self.store.fail_dependants(db, row[0], time.time())
                    continue
                db.execute("UPDATE jobs SET hand_attempt=? WHERE id=?", (row[13] + 1, row[0]))
                specs.append(spec)
        return specs

    def _spec(self, row):
        jid, owner, name, argv, shell, cwd, env_text, outputs, gpus, mfm, timeout, retries, used, attempts = row
        argv, outputs = json.loads(argv), json.loads(outputs or "[]")
        env = dict(json.loads(env_text)) if env_text else {}
        temps = [_dispatch._temp_name(o, "") for o in outputs]
        if shell:  # the shell line gets the temporary names quoted, as `run --shell` does
            argv = argv[:2] + [_dispatch._sub_outputs(argv[2], [shlex.quote(t) for t in temps])]
        else:
            argv = [_dispatch._sub_outputs(a, temps) for a in argv]
        env["GPUFLEET_JOB_ID"] = str(jid)
        if self.run_as_owners and owner != self.uid:  # Note [Who may use a queue]
            argv = [sys.executable, "-I", runas.__file__, str(owner), cwd or "/", "--", *argv]
            env, cwd = {runas.ENV_VAR: json.dumps(env)}, "/"
        fs = os.fsencode
        return _core.TaskSpec(jid - 1, f"job-{jid}", fs(name or ""), [fs(a) for a in argv],
                              [(fs(k), fs(v)) for k, v in env.items()], fs(cwd or ""),
                              [(fs(o), fs(t)) for o, t in zip(outputs, temps)], gpus, mfm or 0, timeout or 0.0,
                              max(0, retries - used), -1, attempts + 1)

    # ---- events: the jobs' progress into the database ----------------------------------------------

    def _on_events(self, events) -> None:
        more = False
        now = time.time()
        with self.store.tx() as db:
            for ev in events:
                kind = ev.kind
                if kind == "message":
                    self.note(ev.message)
                    continue
                jid = ev.seq + 1
                if kind == "started":
                    db.execute("UPDATE jobs SET state='running', attempts=?, devices=?, node=?, pid=?, started=?, "
                               "ended=NULL, log_path=?, message=NULL WHERE id=?",
                               (ev.attempt, json.dumps([self.names[i] for i in ev.devices]), HOSTNAME, ev.pid or None,
                                ev.start, ev.log_path or None, jid))
                elif kind == "not_started":  # drained or stopped before it started: back in the queue
                    db.execute("UPDATE jobs SET state='queued', handed=0 WHERE id=? AND state IN ('queued','retrying')",
                               (jid,))
                elif kind == "finished":
                    more |= self._finished(db, ev, jid, now)
        if more:
            self.d.notify_input()
        self.changed()

    def _finished(self, db, ev, jid: int, now: float) -> bool:
        """One Finished event; returns whether jobs may have become ready."""
        hand, cancel_req, used = db.execute("SELECT hand_attempt, cancel_requested, retries_used FROM jobs WHERE id=?",
                                            (jid,)).fetchone()
        if not ev.final:
            why = f"attempt {ev.attempt} {ev.status}: {ev.message}; retrying"
            db.execute("UPDATE jobs SET state='retrying', pid=NULL, ended=?, exit_code=?, signal=?, message=? "
                       "WHERE id=?", (ev.end, ev.exit_code, ev.signal, why, jid))
            return False
        if ev.status == "cancelled" and not cancel_req:  # the queue stopped, the job did nothing wrong
            why = f"attempt {ev.attempt} was interrupted: the queue stopped; queued again"
            if ev.attempt:
                db.execute("UPDATE attempts SET status='interrupted', message=? WHERE key=? AND attempt=?",
                           (why, f"job-{jid}", ev.attempt))
            db.execute("UPDATE jobs SET state='queued', handed=0, pid=NULL, retries_used=?, message=? WHERE id=?",
                       (used + max(0, ev.attempt - (hand or 1)), why if ev.attempt else None, jid))
            return True
        message = ev.message if ev.status != "succeeded" else None
        if ev.status == "cancelled":
            message = f"cancelled by {_user(cancel_req - 1)}" + (" while it ran" if ev.pid else " before it started")
        db.execute("UPDATE jobs SET state=?, handed=0, pid=NULL, ended=?, exit_code=?, signal=?, message=?, "
                   "log_path=COALESCE(?, log_path) WHERE id=?",
                   (ev.status, ev.end or now, ev.exit_code, ev.signal, message, ev.log_path or None, jid))
        if ev.status != "succeeded":
            self.store.fail_dependants(db, jid, now)
            return False
        return self.store.dependants_waiting(db, jid)

    # ---- control ------------------------------------------------------------------------------------

    def stop(self, drain: bool) -> None:
        """Drain: running jobs finish, nothing new starts. Otherwise the kill sequence on every running job
        (they are queued again, Note [Queue recovery]). Jobs not started stay queued either way."""
        self.stopping = True
        (self.d.drain if drain else self.d.cancel)()
