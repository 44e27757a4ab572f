"""The queue's commands: `gpufleet submit`, `queue start|stop|status`, `ls`, `tail`, `cancel`, `wait`,
`retry` (and `top`, in top.py). A per-user queue that outlives the shell, as task-spooler's `ts` is,
on the GPU dispatcher: see gpufleet/queue/__init__.py. Stdlib only until a request needs more
(Note [Lazy package])."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from ..queue import client as _client
from ..queue.paths import QueueError, locate
from ..queue.settings import add_settings, settings_from
from ..queue.store import FINAL, read_stopped_queue
from . import _queue_view as view

TYPE_CHECKING = False  # typing costs every queue command 4 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Optional

COMMANDS = ("submit", "queue", "ls", "tail", "cancel", "wait", "retry", "top")

_SUBMIT_DOC = """Queue CMD ARGS... and print its job id. The first submit starts the queue's daemon (one per
user: it outlives this shell); the job runs with this shell's environment and directory, on a GPU
of the queue's pool chosen when a slot (and, with --min-free-memory, the memory) is free.
Higher --priority starts first; --after waits for jobs that must succeed (if one does not, this job
ends as dependency_failed). Each word of CMD stays one argument (no shell unless --shell).

Many jobs at once, over one connection: CMD followed by GNU parallel's input sources (::: values,
:::: files, :::+ / ::::+ linked) queues one job per input, its placeholders ({} {.} {/} {//} {/.} {#}
{n} ...) expanded as `gpufleet run` expands them, in --output and --name too; one id a line. Every
input is read and checked before the first job is queued."""


def _group_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", default=None, metavar="NAME",
                   help="use the shared queue of group NAME (default: $GPUFLEET_QUEUE_GROUP, else your own queue)")


def _ids(values) -> list:
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if not re.fullmatch(r"[0-9]+", part) or int(part) < 1:
                raise ValueError(f"{part!r} is not a job id (a positive number, as `gpufleet submit` prints)")
            out.append(int(part))
    return out


def register(sub) -> None:
    p = sub.add_parser("submit", help="queue a command in the queue that outlives the shell; prints its job id",
                       description=_SUBMIT_DOC)
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the job (0: a CPU job; default 1)")
    p.add_argument("--min-free-memory", default=None, help="start only when its GPU has this much free ('20GiB')")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the job's process group is stopped")
    p.add_argument("--retries", type=int, default=0, help="extra attempts after a failure, preferably on another GPU")
    p.add_argument("--output", action="append", default=[], metavar="PATH",
                   help="a file the command writes as {output} (renamed into place on success); repeat for "
                        "{output0} {output1} ...")
    p.add_argument("--cwd", default=None, help="the job's directory (default: the current one)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable for the job")
    p.add_argument("--after", action="append", default=[], metavar="ID[,ID...]",
                   help="run after these jobs succeeded (task-spooler's -D)")
    p.add_argument("-d", "--after-previous", action="store_true",
                   help="run after your previous job succeeded (task-spooler's -d)")
    p.add_argument("--priority", type=int, default=0, help="higher starts first (default 0)")
    p.add_argument("--name", default=None, help="the job's name in listings (default: the command)")
    p.add_argument("--shell", action="store_true", help="CMD is one shell line, run with /bin/sh -c")
    _group_option(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="command", help="-- CMD ARGS...")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("queue", help="start, stop or describe the queue's daemon",
                       description="gpufleet queue start [settings] | stop [--drain] | status [--json]. The settings "
                                   "of start are kept for later starts (the first submit starts it too).")
    qsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = qsub.add_parser("start", help="start the daemon (it runs the queued jobs)")
    add_settings(s)
    s.add_argument("--foreground", action="store_true", help="stay in the foreground (for systemd and the like)")
    s = qsub.add_parser("stop", help="stop the daemon: running jobs are stopped and queued again (the queue is kept)")
    s.add_argument("--drain", action="store_true", help="let running jobs finish first (nothing new starts)")
    _group_option(s)
    s = qsub.add_parser("status", help="the daemon's pid, GPUs, slots, counts and recent messages")
    s.add_argument("--json", action="store_true", help="machine-readable JSON")
    _group_option(s)
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("ls", help="list the queue's jobs: queued, running (GPU, node), ended (exit status)",
                       description="The jobs of the queue: running ones first, then the queued ones in the order "
                                   "they will start, then the ended ones (latest first).")
    p.add_argument("ids", nargs="*", help="only these jobs")
    p.add_argument("--json", action="store_true", help="machine-readable JSON (with --watch: one object a line)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes")
    _group_option(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("tail", help="the output of a job (its latest attempt); -f follows it until it ends",
                       description="The last lines of a job's output (stdout and stderr). With -f, follow it until "
                                   "the job ends and exit with its exit status (task-spooler's -t).")
    p.add_argument("id", help="the job")
    p.add_argument("-n", "--lines", default="10", help="how many of the last lines ('all': everything; default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="follow the output until the job ends")
    _group_option(p)
    p.set_defaults(func=cmd_tail)

    for name, func, text in (
            ("cancel", cmd_cancel, "cancel jobs: a queued one is removed, a running one gets SIGTERM, then SIGKILL"),
            ("wait", cmd_wait, "wait for jobs to end; exit with the exit status of the first that failed (0 if none)"),
            ("retry", cmd_retry, "queue jobs that ended again (and the dependants that failed because of them)")):
        p = sub.add_parser(name, help=text, description=text + ".")
        p.add_argument("ids", nargs="+", help="job ids")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit status 124)")
        _group_option(p)
        p.set_defaults(func=func)


def _fail(cmd: str, msg: str, status: int = 2) -> int:
    print(f"gpufleet {cmd}: {msg}", file=sys.stderr)
    return status


# ---- submit --------------------------------------------------------------------------------------

def cmd_submit(args) -> int:
    words = list(args.cmd)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        return _fail("submit", "no command: gpufleet submit [options] -- CMD ARGS...")
    env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            return _fail("submit", f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    command = words[:next((i for i, w in enumerate(words) if w in _SEPARATORS), len(words))]  # before any :::
    if args.output and not any("{output" in w for w in command):
        return _fail("submit", "--output is given but the command never uses {output} (the temporary name it must "
                               "write, renamed to the output when the job succeeds)")
    if len(command) < len(words):
        return _submit_each(args, words, env)
    if args.shell and len(words) != 1:
        words = [" ".join(words)]
    try:
        reply = _client.request("submit", args.group, autostart=True,
                                **_job(args, words[0] if args.shell else words, args.output, args.name, env))
    except QueueError as e:
        return _fail("submit", str(e), 1)
    print(reply["id"])
    return 0


_SEPARATORS = (":::", ":::+", "::::", "::::+")  # cli/inputs.py's, without importing it for a single job
_OUTPUT_WORD = re.compile(r"\{output\d*\}")  # what queue/runner.py fills in (_dispatch._sub_outputs)


def _job(args, cmd, outputs, name, env) -> dict:
    return _client.job_message(cmd, gpus=args.gpus, min_free_memory=args.min_free_memory, timeout=args.timeout,
                               retries=args.retries, outputs=outputs, cwd=args.cwd, env=env, after=_ids(args.after),
                               after_previous=args.after_previous, priority=args.priority, name=name,
                               shell=args.shell)


def _submit_each(args, words: list, env: dict) -> int:
    """One job per input row (GNU parallel's sources and placeholders, as `gpufleet run` reads them),
    all checked before the first is queued, then sent over one connection."""
    from .. import _dispatch_template as tpl
    from . import inputs as _inputs

    try:
        template, sources = _inputs.split_command(words)
        if not template:
            raise ValueError("no command before the input sources: gpufleet submit [options] -- CMD ARGS ::: VALUES")
        if not sources:
            raise ValueError(f"{words[-1]} ends the command with no values after it")
        templates = template + args.output + ([args.name] if args.name else [])
        tpl.check_template(templates)
        if any("{%}" in w for w in templates):
            raise ValueError("{%} (the job slot) is only known to `gpufleet run`; a queued job is not in a slot "
                             "group: use {#}, or $CUDA_VISIBLE_DEVICES in the job")
        used = tpl.max_input_index(templates)
        if used > len(sources):
            raise ValueError(f"the command uses {{{used}}} but there {'is' if len(sources) == 1 else 'are'} "
                             f"{len(sources)} input source{'s' if len(sources) != 1 else ''}")
        jobs, claimed = [], {}
        for seq1, row in enumerate(_inputs.Inputs(sources).rows(), 1):
            for v in row:  # the daemon fills {output} in a job's words: an input's own text must not hold one
                m = _OUTPUT_WORD.search(v)
                if m:
                    raise ValueError(f"input {v!r} (job {seq1}) contains {m.group(0)}, which "
                                     "the queue would replace with the job's output name; `gpufleet run` takes it")
            cmd = tpl.expand_command(template, row, seq1, "{output}", shell=args.shell)
            outputs = [tpl.expand(o, row, seq1, None) for o in args.output]
            for o in outputs:
                path = os.path.abspath(os.path.join(args.cwd or "", o))
                if path in claimed:
                    raise ValueError(f"jobs {claimed[path]} and {seq1} of this submit both write {o!r}: give each "
                                     "input its own --output (with {}, {#} ...)")
                claimed[path] = seq1
            name = tpl.expand(args.name, row, seq1, None) if args.name else None
            jobs.append(_job(args, cmd, outputs, name, env))
    except (ValueError, OSError) as e:
        return _fail("submit", str(e))
    for k, msg in enumerate(jobs):
        try:
            reply = _client.request("submit", args.group, autostart=True, **msg)
        except QueueError as e:
            done = f"the first {k} of {len(jobs)} jobs are queued (their ids above); " if k else ""
            return _fail("submit", f"{done}job {k + 1}: {e}", 1)
        print(reply["id"], flush=k == len(jobs) - 1)
    return 0


# ---- queue start | stop | status -------------------------------------------------------------------

def cmd_queue(args) -> int:
    return {"start": _queue_start, "stop": _queue_stop, "status": _queue_status}[args.action](args)


def _queue_start(args) -> int:
    paths = locate(args.group)
    settings = settings_from(args)
    try:
        running = _client.request("status", args.group)["queue"]
    except QueueError:
        running = None
    if running is not None:
        if any(v is not None for v in settings.values()):
            return _fail("queue", f"{paths.describe()} is running (daemon pid {running['pid']}) with its settings: "
                                  "stop it (gpufleet queue stop --drain) to start it with others", 1)
        print(f"gpufleet queue: already running: {view.queue_line(running)}")
        return 0
    if args.foreground:
        from ..queue import daemon

        return daemon.run(paths, settings)
    options = []
    for name, value in settings.items():
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    try:
        _client.start_daemon(paths, options)
        status = _client.request("status", args.group)["queue"]
    except QueueError as e:
        return _fail("queue", str(e), 1)
    print(f"gpufleet queue: started: {view.queue_line(status)}")
    return 0


def _queue_stop(args) -> int:
    try:
        r = _client.request("stop", args.group, drain=args.drain)
    except _client.QueueNotRunning as e:
        print(f"gpufleet queue: {e}")
        return 0
    except QueueError as e:
        return _fail("queue", str(e), 1)
    _wait_gone(r["pid"])  # stopped means gone: a start right after must not meet the old daemon
    requeued = r.get("requeued") or []
    print("gpufleet queue: stopped" + (f"; running jobs queued again: {', '.join(map(str, requeued))}" if requeued
                                       else "") + " (queued jobs stay queued)")
    return 0


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    """Until the process has ended (a zombie waiting for whoever adopted it counts as ended)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except OSError:
            return
        time.sleep(0.02)


def _queue_status(args) -> int:
    try:
        r = _client.request("ls", args.group)
    except _client.QueueNotRunning as e:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"gpufleet queue: {e}")
        return 3
    q = r["queue"]
    counts: dict = {}
    for j in r["jobs"]:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    if args.json:
        print(json.dumps({"running": True, **q, "counts": counts}))
        return 0
    print(view.queue_line(q))
    print("jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    print(f"database: {q['database']}")
    for m in q["messages"]:
        print(f"  {m}")
    return 0


# ---- ls --------------------------------------------------------------------------------------------

def _snapshot(args) -> dict:
    ids = _ids(args.ids) or None
    try:
        r = _client.request("ls", args.group, ids=ids)
        return {"jobs": r["jobs"], "queue": r["queue"]}
    except _client.QueueNotRunning:
        if args.group is not None:
            raise
        # a stopped private queue is still a file its owner can read
        jobs = read_stopped_queue(locate(None).db)
        if ids:
            jobs = [j for j in jobs if j["id"] in ids]
        for j in jobs:
            j["user"] = None
        return {"jobs": jobs, "queue": {"pid": None}}


def cmd_ls(args) -> int:
    width = max(80, _terminal_width())
    if args.watch is not None:
        from . import _watch

        _watch.check(args.watch, args.count)
        return _watch.watch(lambda: _snapshot(args), lambda d: view.table(d["jobs"], d["queue"], width), "gpufleet ls",
                            args.watch, args.count, args.json)
    try:
        data = _snapshot(args)
    except QueueError as e:
        return _fail("ls", str(e), 1)
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(view.table(data["jobs"], data["queue"], width))
    return 0


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        return 160


# ---- tail ------------------------------------------------------------------------------------------

def cmd_tail(args) -> int:
    jid = _ids([args.id])
    if len(jid) != 1:
        return _fail("tail", f"{args.id!r}: tail takes one job id")
    lines = None if args.lines == "all" else args.lines
    if lines is not None and not re.fullmatch(r"[0-9]+", lines):
        return _fail("tail", f"-n {args.lines!r}: expected a number of lines or 'all'")
    out = sys.stdout.buffer
    try:
        first = {"offset": 0} if lines is None else {"lines": int(lines)}
        r = _client.request("tail", args.group, id=jid[0], **first)
        path = r["log_path"]
        while True:
            out.write(os.fsencode(r["data"]))
            out.flush()
            if r["data"]:  # more may be there already: read on before sleeping
                r = _client.request("tail", args.group, id=jid[0], offset=r["offset"])
                continue
            if not args.follow or r["state"] in FINAL:
                break
            time.sleep(0.2)
            offset = r["offset"]
            r = _client.request("tail", args.group, id=jid[0], offset=offset)
            if r["log_path"] != path and r["log_path"]:  # a new attempt: its output from its start
                out.write(f"==> attempt {r['attempt']} <==\n".encode())
                path = r["log_path"]
                r = _client.request("tail", args.group, id=jid[0], offset=0)
    except QueueError as e:
        return _fail("tail", str(e), 1)
    if args.follow:
        return r["exit_status"] if r["exit_status"] is not None else 0
    return 0


# ---- cancel, wait, retry ---------------------------------------------------------------------------

def cmd_cancel(args) -> int:
    try:
        r = _client.request("cancel", args.group, ids=_ids(args.ids))
    except QueueError as e:
        return _fail("cancel", str(e), 1)
    for note in r["notes"]:
        print(f"gpufleet cancel: {note}", file=sys.stderr)
    return 0 if all(j["state"] in FINAL for j in r["jobs"]) else 1


def cmd_wait(args) -> int:
    ids = _ids(args.ids)
    try:
        paths = locate(args.group)
        conn = _client.connect(paths, autostart=False)
        try:
            r = conn.request("wait", ids=ids, timeout=args.timeout)
        finally:
            conn.close()
    except QueueError as e:
        return _fail("wait", str(e), 1)
    by_id = {j["id"]: j for j in r["jobs"]}
    if not r["done"]:
        waiting = [str(i) for i in ids if by_id[i]["exit_status"] is None]
        if r["stopping"]:
            return _fail("wait", f"the queue daemon stopped before job(s) {', '.join(waiting)} ended (they stay "
                                 "queued for its next start)", 3)
        return _fail("wait", f"--timeout {args.timeout:g}: job(s) {', '.join(waiting)} still not ended", 124)
    status = 0
    for i in ids:
        j = by_id[i]
        if j["exit_status"] != 0:
            print(f"gpufleet wait: job {i} {j['state']}" + (f": {j['message']}" if j["message"] else ""),
                  file=sys.stderr)
            status = status or j["exit_status"]
    return status


def cmd_retry(args) -> int:
    try:
        r = _client.request("retry", args.group, ids=_ids(args.ids))
    except QueueError as e:
        return _fail("retry", str(e), 1)
    print("queued again: " + ", ".join(map(str, r["requeued"])))
    return 0
