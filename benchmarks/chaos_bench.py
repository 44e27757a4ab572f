"""Chaos run of the dispatcher (issue 12): real tasks under SIGKILLs of tasks, drains, cancels,
SIGKILLs of the dispatcher (some through `pkill -9 -f '<its command line>'`) and of its supervisor,
each followed by a resume, until every task has succeeded. Then it counts what must be zero and
measures what cannot be:

- lost: tasks not recorded as succeeded, or whose declared output is missing, at the end;
- duplicated: tasks with more than one succeeded attempt in the journal (across all runs);
- partial: declared outputs whose content is not the complete one, and temporary files left over;
- orphans: processes of any of the runs (marker GPUFLEET_RUN_ID=<run id> in their environment) or
  supervisors still alive once their run's dispatcher has exited (kill grace + 5 s later);
- re-run window (Note [Re-runs after a crash] in csrc/dispatch/completion.cpp): tasks whose command
  had completed when the dispatcher was SIGKILLed but whose success was not yet recorded
  ("unrecorded"), how many of those ran again on resume ("re-run"; tasks with declared outputs
  renamed into place are trusted instead), and the latency from each task's last action to the
  journal's record of its end (p50 / p99 / max).

Half the tasks declare an output (written partially, then completely: a kill leaves a partial
temporary file), half do not. Each task appends "S <pid> <time>" and "E <pid> <time>" (start, end of
its work) to its own marks file.

    PYTHONPATH=<build>/stage python benchmarks/chaos_bench.py [--tasks 10000] [--kills 17] [--seed 1]
    (tests/chaos/test_chaos.py runs the same with a few hundred tasks in `make test`)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TASK = r'''m="$2/$1"; echo "S $$ $EPOCHREALTIME" >> "$m"
if [ -n "$3" ]; then printf partial > "$3"; fi
sleep "$4"
if [ -n "$3" ]; then printf 'complete %s\n' "$1" > "$3"; fi
echo "E $$ $EPOCHREALTIME" >> "$m"'''


# ---- the dispatcher process ----------------------------------------------------------------------

def driver(a) -> int:
    """One dispatcher: every task of the run, resumed from the journal when asked."""
    import gpufleet

    gpufleet.simulate_gpus(a.gpus)
    work = Path(a.work)
    rnd = random.Random(a.seed)
    durations = [round(0.005 + rnd.random() * a.max_duration, 3) for _ in range(a.tasks)]

    def tasks():
        for i in range(a.tasks):
            with_output = i % 2 == 0
            yield gpufleet.Task(["bash", "-c", TASK, "task", str(i), str(work / "marks"),
                                 "{output}" if with_output else "", str(durations[i])],
                                outputs=[work / "out" / f"{i}.txt"] if with_output else [], retries=1,
                                name=f"t{i}")

    report = gpufleet.run(tasks(), slots_per_device=a.slots, journal=work / "journal.sqlite", resume=a.resume,
                          kill_grace=a.kill_grace, retry_backoff=0.05, quarantine_after=0, output="null",
                          progress=False, total=a.tasks)
    print("COUNTS", json.dumps(report.counts), flush=True)
    return 0


# ---- the harness ----------------------------------------------------------------------------------

@dataclass
class Totals:
    rounds: int = 0
    task_kills: int = 0
    drains: int = 0
    cancels: int = 0
    dispatcher_kills: int = 0
    pkills: int = 0
    supervisor_kills: int = 0
    supervisor_replaced: int = 0
    orphans: int = 0
    unrecorded: int = 0       # completed, not recorded, when a dispatcher was SIGKILLed
    rerun: int = 0            # ... of which ran again on resume
    orphan_pids: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # (task, E marks then) of the unrecorded ones


def _environ_has(pid: int, prefix: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(e.startswith(prefix) for e in f.read().split(b"\0"))
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _run_ids(journal: Path) -> list[str]:
    if not journal.exists():
        return []
    con = sqlite3.connect(journal, timeout=30)
    try:
        return [r[0] for r in con.execute("SELECT run_id FROM runs")]
    except sqlite3.Error:
        return []
    finally:
        con.close()


def _survivors(run_ids: list[str]) -> list[int]:
    """Live processes of these runs: tasks (their marker) and supervisors (their title)."""
    prefixes = [f"GPUFLEET_RUN_ID={r}".encode() for r in run_ids]
    titles = [f"gf-supervisor run {r}" for r in run_ids]
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        if _state(pid) in ("Z", "X", "?"):
            continue
        if any(_cmdline(pid).startswith(t) for t in titles) or any(_environ_has(pid, p) for p in prefixes):
            out.append(pid)
    return out


def _succeeded(journal: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM tasks WHERE state='succeeded'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _children(pid: int) -> list[int]:
    """Children of every thread of `pid` (tasks are forked by the launcher threads)."""
    out = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in threads:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _marks(work: Path, i: int) -> list[tuple[str, int, float]]:
    try:
        text = (work / "marks" / str(i)).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), float(parts[2])))
    return out


class Round:
    """One dispatcher process and the chaos aimed at it."""

    def __init__(self, cfg, totals: Totals, resume: bool, rnd: random.Random):
        self.cfg, self.totals, self.rnd = cfg, totals, rnd
        self.work = Path(cfg.work)
        self.journal = self.work / "journal.sqlite"
        args = [sys.executable, os.path.abspath(__file__), "--driver", "--work", cfg.work, "--tasks", str(cfg.tasks),
                "--slots", str(cfg.slots), "--gpus", str(cfg.gpus), "--seed", str(cfg.seed),
                "--max-duration", str(cfg.max_duration), "--kill-grace", str(cfg.kill_grace)]
        if resume:
            args.append("--resume")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace")
        self.output: list[str] = []
        self.reader = threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        self.killed_pids: set[int] = set()
        self.seen: set[int] = set()
        self.start_done = max(0, _succeeded(self.journal))

    def progress(self) -> int:
        return max(0, _succeeded(self.journal)) - self.start_done

    def supervisor(self):
        for c in _children(self.proc.pid):
            if _cmdline(c).startswith("gf-supervisor run "):
                return c
        return None

    def kill_some_tasks(self, rate: float) -> None:
        sup = self.supervisor()
        for c in _children(self.proc.pid):
            if c == sup or c in self.seen:
                continue
            self.seen.add(c)
            if self.rnd.random() < rate:
                try:
                    os.kill(c, signal.SIGKILL)
                    self.killed_pids.add(c)
                    self.totals.task_kills += 1
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        self.proc.stdout.close()
        return rc


def run_chaos(cfg, log=print) -> dict:
    """The whole campaign; returns the figures (see the module docstring)."""
    work = Path(cfg.work)
    (work / "marks").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    journal = work / "journal.sqlite"
    rnd = random.Random(cfg.seed)
    totals = Totals()
    t0 = time.monotonic()
    # the plan: `kills` dispatcher SIGKILLs (every third through pkill -f), a drain and a cancel among
    # them, a supervisor SIGKILL in every other round; then runs without chaos until everything succeeded
    plan = []
    for k in range(cfg.kills):
        plan.append("pkill" if k % 3 == 2 else "kill")
        if k == 0:
            plan.append("drain")
        if k == cfg.kills // 2:
            plan.append("cancel")
    if cfg.kills == 0:
        plan = ["drain", "cancel"]
    per_round = max(4, cfg.tasks // (len(plan) + 2))
    resume = False
    for r, action in enumerate(plan + ["finish"] * 5):
        if action == "finish" and _succeeded(journal) == cfg.tasks:
            break
        totals.rounds += 1
        rd = Round(cfg, totals, resume, rnd)
        resume = True
        # the amount of progress after which the action strikes: random, so kills land at every phase
        target = int(per_round * (0.5 + rnd.random()))
        sup_kill_at = target // 2 if (r % 2 == 0 and action != "finish") else None
        rate = cfg.task_kill_rate if action != "finish" else 0.0
        struck = False
        killed_sup = None
        while rd.proc.poll() is None:
            time.sleep(0.02)
            if rate:
                rd.kill_some_tasks(rate)
            done = rd.progress()
            if sup_kill_at is not None and done >= sup_kill_at:
                sup = rd.supervisor()
                if sup:
                    os.kill(sup, signal.SIGKILL)
                    totals.supervisor_kills += 1
                    sup_kill_at = None
                    killed_sup = sup
            if killed_sup is not None and rd.supervisor() not in (None, killed_sup):
                totals.supervisor_replaced += 1  # the dispatcher started a new one
                killed_sup = None
            if struck or action == "finish" or done < target:
                continue
            struck = True
            if action == "drain":
                rd.proc.send_signal(signal.SIGINT)
                totals.drains += 1
            elif action == "cancel":
                rd.proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
                rd.proc.send_signal(signal.SIGINT)
                totals.cancels += 1
            elif action == "kill":
                rd.proc.kill()
                totals.dispatcher_kills += 1
            elif action == "pkill":
                cmd = _cmdline(rd.proc.pid)
                subprocess.run(["pkill", "-9", "-f", re.escape(cmd)], check=False)
                totals.dispatcher_kills += 1
                totals.pkills += 1
        rc = rd.wait(600)
        text = "".join(rd.output)
        if rc not in (0, 1, -9, 130) and not text.count("COUNTS"):
            raise RuntimeError(f"round {r} ({action}): the dispatcher exited {rc}:\n{text[-3000:]}")
        # orphans: nothing of any run may outlive its dispatcher by more than the kill sequence
        deadline = time.monotonic() + cfg.kill_grace + 5
        left = _survivors(_run_ids(journal))
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _survivors(_run_ids(journal))
        if left:
            totals.orphans += len(left)
            totals.orphan_pids += left
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if rc == -9:
            _count_unrecorded(work, journal, totals, rd)
        log(f"  round {totals.rounds:2d} {action:6s}: exit {rc:4d}, {_succeeded(journal):6d}/{cfg.tasks} succeeded, "
            f"{totals.task_kills} task kills so far, {time.monotonic() - t0:6.1f} s")
    return _final(cfg, work, journal, totals, time.monotonic() - t0)


def _count_unrecorded(work: Path, journal: Path, totals: Totals, rd: Round) -> None:
    """After a dispatcher SIGKILL: tasks recorded "running" whose command had completed (an E mark
    from the pid of their last start, which no one killed). They are what the re-run window holds."""
    con = sqlite3.connect(journal, timeout=30)
    try:
        running = [(k, n) for k, n in con.execute("SELECT key, name FROM tasks WHERE state='running'")]
    finally:
        con.close()
    pending = []
    for key, name in running:
        i = int(name[1:])
        marks = _marks(work, i)
        starts = [m for m in marks if m[0] == "S"]
        if not starts:
            continue
        pid = starts[-1][1]
        if pid in rd.killed_pids:
            continue
        if any(m[0] == "E" and m[1] == pid for m in marks):
            pending.append((i, len([m for m in marks if m[0] == "E"])))  # even i: declared output
    totals.unrecorded += len(pending)
    totals.pending.extend(pending)


def _final(cfg, work: Path, journal: Path, totals: Totals, wall: float) -> dict:
    con = sqlite3.connect(journal, timeout=30)
    try:
        states = dict(con.execute("SELECT name, state FROM tasks").fetchall())
        dup = con.execute("SELECT count(*) FROM (SELECT key FROM attempts WHERE status='succeeded' GROUP BY key "
                          "HAVING count(*) > 1)").fetchone()[0]
        ends = dict(con.execute("SELECT name, end FROM tasks WHERE state='succeeded'").fetchall())
        attempts = con.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        con.close()
    lost, partial, latencies = 0, 0, []
    for i in range(cfg.tasks):
        if states.get(f"t{i}") != "succeeded":
            lost += 1
            continue
        if i % 2 == 0:
            out = work / "out" / f"{i}.txt"
            if not out.exists():
                lost += 1
            elif out.read_text() != f"complete {i}\n":
                partial += 1
        marks = _marks(work, i)
        e = [m for m in marks if m[0] == "E"]
        if e and ends.get(f"t{i}"):
            latencies.append(ends[f"t{i}"] - e[-1][2])
    partial += sum(1 for p in (work / "out").iterdir() if ".gfpart" in p.name)
    # of the tasks that were complete but unrecorded at a crash: which ran again (one more E mark)
    rerun = [i for i, ends_then in totals.pending if len([m for m in _marks(work, i) if m[0] == "E"]) > ends_then]
    totals.rerun = len(rerun)
    latencies.sort()

    def q(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"tasks": cfg.tasks, "rounds": totals.rounds, "task_kills": totals.task_kills, "drains": totals.drains,
            "cancels": totals.cancels, "dispatcher_kills": totals.dispatcher_kills, "pkills": totals.pkills,
            "supervisor_kills": totals.supervisor_kills, "supervisor_replaced": totals.supervisor_replaced,
            "attempts": attempts, "lost": lost, "duplicated": dup, "partial": partial, "orphans": totals.orphans,
            "orphan_pids": totals.orphan_pids, "unrecorded_at_crash": totals.unrecorded,
            "unrecorded_with_outputs": sum(1 for i, _ in totals.pending if i % 2 == 0),
            "rerun_after_crash": len(rerun), "rerun_with_outputs": sum(1 for i in rerun if i % 2 == 0),
            "window_ms_p50": round(q(0.5), 1), "window_ms_p99": round(q(0.99), 1), "window_ms_max": round(q(1.0), 1),
            "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help="working directory (default: a new temporary one, removed)")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--kills", type=int, default=17, help="dispatcher SIGKILLs (every third through pkill -f)")
    ap.add_argument("--task-kill-rate", type=float, default=0.05, help="share of task processes SIGKILLed")
    ap.add_argument("--slots", type=int, default=4, help="slots per simulated GPU")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--max-duration", type=float, default=0.15, help="tasks sleep 5 ms to this long")
    ap.add_argument("--kill-grace", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.driver:
        return driver(a)
    tmp = None
    if a.work is None:
        tmp = a.work = tempfile.mkdtemp(prefix="gf-chaos-")
    try:
        print(f"chaos: {a.tasks} tasks, {a.kills} dispatcher kills, {a.task_kill_rate:.0%} of tasks killed, "
              f"{a.gpus} GPUs x {a.slots} slots, seed {a.seed}", flush=True)
        res = run_chaos(a, log=lambda s: print(s, flush=True))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    bad = {k: res[k] for k in ("lost", "duplicated", "partial", "orphans") if res[k]}
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
