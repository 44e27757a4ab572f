"""What the queue daemon answers: one method per request (``op``), each given the peer's uid as the
kernel reported it (SO_PEERCRED, read again for every request). Note [Who may use a queue] in
paths.py says who may do what.
"""
from __future__ import annotations

import os
import pwd
import time
from typing import Optional

from .. import _core, _dispatch
from .paths import QueueError
from .runner import HOSTNAME
from .store import ACTIVE, FINAL, dependency_message, env_key

_RESERVED_ENV = set(_dispatch._RESERVED_ENV) | {"GPUFLEET_JOB_ID", "GPUFLEET_QUEUE_JOB_ENV"}
_TAIL_CHUNK = 1 << 20


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _ids(value, what: str = "ids") -> list:
    if not isinstance(value, list) or not value or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise ValueError(f"{what} must be a non-empty list of job ids, got {value!r}")
    return value


def _int(msg: dict, key: str, default: int, minimum: Optional[int] = None) -> int:
    v = msg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {v}")
    return v


class Requests:
    def __init__(self, daemon):
        self.q = daemon

    def handle(self, msg: dict, uid: int, conn: dict) -> dict:
        """``conn``: what the daemon keeps per connection (the environment sent last)."""
        op = msg.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise QueueError(f"unknown request {op!r}")
        self.q.authorize(uid)
        reply = (method(msg, uid, conn) if op == "submit" else method(msg, uid)) or {}
        reply["ok"] = True
        return reply

    def _job(self, db, jid: int) -> dict:
        rec = self.q.store.row(db, jid)
        if rec is None:
            raise QueueError(f"job {jid}: no such job in {self.q.paths.describe()}")
        return rec

    def _own(self, rec: dict, uid: int, what: str) -> None:
        if self.q.group is not None and uid not in (0, rec["owner"]):
            raise QueueError(f"job {rec['id']} belongs to {user_name(rec['owner'])}: only its owner or root may {what} "
                             "it")

    # ---- submit ---------------------------------------------------------------------------------------

    def op_submit(self, msg: dict, uid: int, conn: dict) -> dict:
        job = self._checked_job(msg, conn)
        after = msg.get("after") or []
        if after:
            _ids(after, "after")
        store = self.q.store
        with store.tx() as db:
            if msg.get("after_previous"):
                row = db.execute("SELECT max(id) FROM jobs WHERE owner=?", (uid,)).fetchone()
                if row[0] is None:
                    raise QueueError("-d (after the previous job): you have no job in this queue yet")
                after = sorted(set(after) | {row[0]})
            states = store.states(db, after)
            unknown = [a for a in after if a not in states]
            if unknown:
                raise QueueError(f"--after {unknown[0]}: no such job in {self.q.paths.describe()}")
            job["after"] = after
            row = store.add_job(db, uid, job, conn["env"][1])
            failed = next(((a, states[a]) for a in after if states[a] in FINAL and states[a] != "succeeded"), None)
            if failed is not None:  # task-spooler's -D: a job after a failed one does not run, visibly
                db.execute("UPDATE jobs SET state='dependency_failed', ended=?, message=? WHERE id=?",
                           (time.time(), dependency_message(*failed), row[0]))
            else:
                self.q.backlog.add(row, [a for a in after if states[a] != "succeeded"])
        self.q.runner.d.notify_input()
        self.q.changed()
        return {"id": row[0]}

    def _checked_job(self, msg: dict, conn: dict) -> dict:
        """The job's fields, checked as `gpufleet run` checks a task (gpufleet.Task), plus the queue's own
        limits (the pool's size). ValueError and TypeError name what was wrong. An environment the
        connection sent before comes as "same" (client.py): it was checked then."""
        shell = bool(msg.get("shell"))
        cmd = msg.get("cmd") if shell else msg.get("argv")
        env, key = msg.get("env"), None
        if env == "same" and "env" in conn:
            env, key = conn["env"]
        elif not isinstance(env, dict):
            raise TypeError(f"env must be a mapping of names to values, got {env!r}")
        else:
            env = {k: v for k, v in env.items() if k not in _RESERVED_ENV}
        cwd = msg.get("cwd")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ValueError(f"cwd must be an absolute path, got {cwd!r}")
        outputs = msg.get("outputs") or []
        if outputs and self.q.runner.run_as_owners:
            raise ValueError("--output is not available in a group queue: its daemon runs as root and would rename "
                             "files in your directories; let the command write its file itself")
        t = _dispatch.Task(cmd, env=env, cwd=cwd, outputs=outputs, gpus=_int(msg, "gpus", 1, 0),
                           min_free_memory=msg.get("min_free_memory"), timeout=msg.get("timeout"),
                           retries=_int(msg, "retries", 0, 0), name=msg.get("name"), shell=shell)
        t._spec(0, "", len(self.q.runner.pool), keyed=False)  # {output} without an output, and the like
        if key is None:
            conn["env"] = (env, env_key(t.env))
        pool = self.q.runner.names
        if t.gpus > len(pool):
            raise ValueError(f"--gpus {t.gpus}: the queue's GPU pool has {len(pool)} ({', '.join(pool) or 'none'}); "
                             "--gpus 0 runs a CPU job")
        return {"name": t.name, "argv": t.cmd, "shell": shell, "cwd": t.cwd, "outputs": t.outputs,
                "gpus": t.gpus, "min_free_memory": t.min_free_memory, "timeout": t.timeout or None,
                "retries": t.retries, "priority": _int(msg, "priority", 0)}

    # ---- reading --------------------------------------------------------------------------------------

    def op_ls(self, msg: dict, uid: int) -> dict:
        ids = msg.get("ids")
        recs = self.q.store.records(_ids(ids) if ids else None)
        if ids:
            missing = sorted(set(ids) - {r["id"] for r in recs})
            if missing:
                raise QueueError(f"job {missing[0]}: no such job in {self.q.paths.describe()}")
        for r in recs:
            r["user"] = user_name(r["owner"])
        reply = {"jobs": recs, "queue": self.status()}
        if msg.get("gpus"):
            reply["gpus"] = self.gpus()
        return reply

    def op_status(self, msg: dict, uid: int) -> dict:
        return {"queue": self.status()}

    def status(self) -> dict:
        r = self.q.runner
        s = self.q.settings
        return {"pid": os.getpid(), "owner": user_name(self.q.uid), "group": self.q.group, "node": HOSTNAME,
                "devices": r.names, "slots": s["slots"], "cpu_slots": s["cpu_slots"],
                "run_id": r.d.run_id, "messages": list(r.messages), "stopping": r.stopping,
                "database": self.q.paths.db}

    def gpus(self) -> list:
        out = []
        infos = {g.ordinal: g for g in _core.devices()}
        for d in self.q.runner.pool:
            g = infos.get(d.ordinal)
            out.append({"device": f"cuda:{d.ordinal}", "name": g.name if g else d.name,
                        "total_memory": g.total_memory if g else None, "free_memory": g.free_memory if g else None,
                        "used_memory": g.used_memory if g else None, "utilization": g.utilization if g else None})
        return out

    def op_tail(self, msg: dict, uid: int) -> dict:
        """A piece of the log of the job's latest attempt: from ``offset``, or the last ``lines`` lines."""
        jid = _ids([msg.get("id")], "id")[0]
        with self.q.store.lock:
            rec = self._job(self.q.store.db, jid)
        self._own(rec, uid, "read the output of")
        path = rec["log_path"]
        reply = {"state": rec["state"], "attempt": rec["attempts"], "log_path": path,
                 "exit_status": rec["exit_status"], "data": "", "offset": 0}
        if not path:
            return reply
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                offset = msg.get("offset")
                if offset is None:
                    offset = _last_lines_offset(f, size, _int(msg, "lines", 10, 0))
                offset = min(max(0, int(offset)), size)
                f.seek(offset)
                data = f.read(min(_int(msg, "max", _TAIL_CHUNK, 1), _TAIL_CHUNK))
        except FileNotFoundError:
            return reply
        reply.update(data=os.fsdecode(data), offset=offset + len(data), size=size)
        return reply

    # ---- changing jobs ----------------------------------------------------------------------------------

    def op_cancel(self, msg: dict, uid: int) -> dict:
        """Cancels jobs: a queued one at once, a handed or running one with the kill sequence (cancel_task);
        replies once each has ended, with its final record."""
        ids = _ids(msg.get("ids"))
        store, notes = self.q.store, {}
        with store.tx() as db:
            recs = [self._job(db, i) for i in ids]
            for rec in recs:
                self._own(rec, uid, "cancel")
            now = time.time()
            for rec in recs:
                jid = rec["id"]
                if rec["state"] in FINAL:
                    notes[jid] = f"job {jid} had already ended ({rec['state']})"
                elif rec["state"] == "queued" and self.q.backlog.withdraw(jid):  # not handed to the dispatcher
                    db.execute("UPDATE jobs SET state='cancelled', cancel_requested=?, ended=?, message=? WHERE id=?",
                               (uid + 1, now, f"cancelled by {user_name(uid)} before it started", jid))
                    self.q.backlog.drop(store.fail_dependants(db, jid, now))
                else:  # the canceller's uid + 1: the Finished event names them (runner.py)
                    db.execute("UPDATE jobs SET cancel_requested=? WHERE id=?", (uid + 1, jid))
                    self.q.runner.d.cancel_task(jid - 1)
        self.q.changed()
        recs = self.q.wait_final(ids, timeout=float(self.q.settings["kill_grace"]) + 30.0)
        for rec in recs:
            if rec["id"] not in notes and rec["state"] != "cancelled" and rec["state"] in FINAL:
                notes[rec["id"]] = f"job {rec['id']} ended ({rec['state']}) before it could be cancelled"
        return {"jobs": recs, "notes": [notes[i] for i in ids if i in notes]}

    def op_wait(self, msg: dict, uid: int) -> dict:
        ids = _ids(msg.get("ids"))
        with self.q.store.lock:
            for i in ids:
                self._job(self.q.store.db, i)
        timeout = msg.get("timeout")
        recs = self.q.wait_final(ids, timeout=None if timeout is None else float(timeout))
        stopping = self.q.runner.stopping or not self.q.runner.thread.is_alive()
        return {"jobs": recs, "done": all(r["state"] in FINAL for r in recs), "stopping": stopping}

    def op_retry(self, msg: dict, uid: int) -> dict:
        ids = _ids(msg.get("ids"))
        store, requeued = self.q.store, []
        with store.tx() as db:
            recs = [self._job(db, i) for i in ids]
            for rec in recs:
                self._own(rec, uid, "retry")
                if rec["state"] in ACTIVE:
                    raise QueueError(f"job {rec['id']} is {rec['state']}: retry takes a job that has ended")
            for rec in recs:
                db.execute("UPDATE jobs SET state='queued', cancel_requested=0, retries_used=0, exit_code=NULL, "
                           "signal=NULL, ended=NULL, pid=NULL, message=? WHERE id=?",
                           (f"retry requested by {user_name(uid)} after it {rec['state']}", rec["id"]))
                requeued += [rec["id"]] + store.requeue_dependants(db, rec["id"])
            for jid in requeued:
                self.q.backlog.add(store.job_row(db, jid), store.pending_deps(db, jid))
        self.q.runner.d.notify_input()
        self.q.changed()
        return {"requeued": requeued}

    def op_stop(self, msg: dict, uid: int) -> dict:
        if uid not in (0, self.q.uid):
            who = "root" if self.q.uid == 0 else f"{user_name(self.q.uid)} (who runs this queue) or root"
            raise QueueError(f"only {who} may stop this queue")
        return {**self.q.stop(drain=bool(msg.get("drain"))), "pid": os.getpid()}


def _last_lines_offset(f, size: int, lines: int) -> int:
    """The offset where the last ``lines`` lines of the file begin (a last line without a newline counts)."""
    if lines == 0:
        return size
    pos, seen = size, 0
    block = 65536
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        for i in range(len(chunk) - 1, -1, -1):
            if chunk[i] == 0x0A and start + i != size - 1:
                seen += 1
                if seen == lines:
                    return start + i + 1
        pos = start
    return 0
