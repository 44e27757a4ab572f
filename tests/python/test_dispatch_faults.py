"""The dispatcher against the faults a hostile user and a crashing machine bring (issue 12): the
supervisor found by `pkill -f` or killed on its own, colliding outputs, names at the length limit,
file names that are not UTF-8, log files of several runs, descriptors of many runs, a journal that
is not a journal, and a resume after a crash between an output's rename and its journal record.
The chaos test (tests/chaos) mixes all the kills at scale."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import gpufleet

HELPERS = Path(__file__).parent / "dispatch_helpers"
sys.path.insert(0, str(HELPERS))
from proc_utils import stage_env as _stage_env, wait_for as _wait_for, wait_gone  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _cli(*args, cwd=None, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "gpufleet", *args], env=env or _stage_env(GPUFLEET_SIMULATED_GPUS="2"),
                          cwd=cwd, capture_output=True, timeout=timeout)


# ---- 1. the supervisor: not found by the dispatcher's command line, and watched ---------------------

def _dispatcher(tmp_path, n, cmd, slots=2):
    return subprocess.Popen([sys.executable, str(HELPERS / "run_tasks.py"), "--n", str(n), "--slots", str(slots),
                             "--cmd", cmd], env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)


def _supervisors(pid):
    """Children of the dispatcher that are not tasks (tasks carry the run's marker in their environment)."""
    out = []
    for c in psutil.Process(pid).children():
        try:
            if not any(k == "GPUFLEET_RUN_ID" for k in c.environ()):
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def test_pkill_by_the_dispatchers_command_line_spares_the_supervisor(tmp_path):
    pids = tmp_path / "pids"
    p = _dispatcher(tmp_path, 4, f'echo $$ >> {pids}; sleep 60 & echo $! >> {pids}; wait')
    assert _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 8)
    cmdline = " ".join(psutil.Process(p.pid).cmdline())
    sup = _supervisors(p.pid)
    assert len(sup) == 1
    assert cmdline not in " ".join(sup[0].cmdline())  # `ps` shows it under its own name
    r = subprocess.run(["pkill", "-9", "-f", re.escape(cmdline)], capture_output=True, text=True)
    assert r.returncode == 0, r
    p.communicate(timeout=30)
    assert p.returncode == -9
    listed = [int(x) for x in pids.read_text().split()]
    assert wait_gone(listed, timeout=15) == []  # the supervisor survived the pkill and stopped every task
    assert wait_gone([sup[0].pid], timeout=10) == []  # then exited


def test_a_killed_supervisor_is_replaced_and_still_covers_every_task(tmp_path):
    pids = tmp_path / "pids"
    p = _dispatcher(tmp_path, 6, f'echo $$ >> {pids}; setsid sleep 60 & echo $! >> {pids}; sleep 60')
    assert _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 8)
    first = _supervisors(p.pid)
    assert len(first) == 1
    first[0].kill()
    # the dispatcher notices (pidfd) and starts another one, which tracks the tasks already running
    assert _wait_for(lambda: [s.pid for s in _supervisors(p.pid)] not in ([], [first[0].pid]), timeout=10)
    second = _supervisors(p.pid)[0]
    time.sleep(0.3)
    p.kill()
    out, _ = p.communicate(timeout=30)
    assert "supervisor" in out and "died" in out, out
    listed = [int(x) for x in pids.read_text().split()]
    assert wait_gone(listed, timeout=15) == []
    assert wait_gone([second.pid], timeout=10) == []


# ---- 2. colliding outputs ---------------------------------------------------------------------------

def _two_inputs(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text(d * 1000)
    return [str(tmp_path / "a" / "x.txt"), str(tmp_path / "b" / "x.txt")]


WRITE = ['sh', '-c', 'touch "$0.ran"; for i in 1 2 3 4 5; do cat "$1"; sleep 0.05; done > "$2"', '{}', '{}', '{output}']


def test_colliding_outputs_are_refused_before_anything_runs(sim_gpus, tmp_path):
    sim_gpus(2)
    inputs = _two_inputs(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        gpufleet.run(gpufleet.product(WRITE, inputs, output=str(out / "{/.}.txt")), quiet=True)
    msg = str(info.value)
    assert str(out / "x.txt") in msg and "task 1" in msg and "task 2" in msg and inputs[1] in msg
    assert not list(tmp_path.rglob("*.ran")) and not out.exists()
    # the same through the CLI: exit 2, no traceback, nothing ran
    r = _cli("run", "--output", str(out / "{/.}.txt"), "--", *WRITE, ":::", *inputs)
    assert r.returncode == 2 and b"Traceback" not in r.stderr and b"x.txt" in r.stderr, r
    assert not list(tmp_path.rglob("*.ran")) and not out.exists()


def test_collisions_known_late_fail_the_later_task_and_keep_the_first_output(sim_gpus, tmp_path):
    sim_gpus(2)
    inputs = _two_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "alias").symlink_to(out)  # another spelling of the same directory

    def lazily():  # a generator: run() cannot look ahead
        yield gpufleet.Task(['sh', '-c', WRITE[2], inputs[0], inputs[0], '{output}'], outputs=[out / "x.txt"])
        yield gpufleet.Task(['sh', '-c', WRITE[2], inputs[1], inputs[1], '{output}'],
                            outputs=[tmp_path / "alias" / "x.txt"])

    rep = gpufleet.run(lazily(), quiet=True)
    tasks = sorted(rep.tasks, key=lambda t: t.seq)
    assert [t.status for t in tasks] == ["succeeded", "failed"]
    assert "also the output of task 1" in tasks[1].message
    assert (out / "x.txt").read_text() == "a" * 5000  # one input's content, whole: no mix, no NUL byte
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]


# ---- 3. names at the length limit -------------------------------------------------------------------

def test_output_names_up_to_255_bytes_work(sim_gpus, tmp_path):
    sim_gpus(1)
    names = ["o" * 251 + ".txt", "é" * 125 + "x.mp4", "n" * 255]  # 255 bytes each
    tasks = [gpufleet.Task(["sh", "-c", 'printf %s "$1" > "$2"', "w", str(i), "{output}"], outputs=[tmp_path / n])
             for i, n in enumerate(names)]
    rep = gpufleet.run(tasks, quiet=True)
    assert rep.ok, rep.summary()
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert [(tmp_path / n).read_text() for n in names] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"256 bytes.*at most 255"):
        gpufleet.Task(["true"], outputs=[tmp_path / ("o" * 252 + ".txt")])


# ---- 4. file names that are not UTF-8 ---------------------------------------------------------------

def test_names_that_are_not_utf8_run_like_any_other(sim_gpus, tmp_path):
    sim_gpus(2)
    weird = os.fsdecode(b"caf\xe9 \xff.txt")  # Latin-1 bytes: legal on Linux, not UTF-8
    (tmp_path / weird).write_bytes(b"data")
    tasks = [gpufleet.Task(["cp", str(tmp_path / weird), "{output}"], outputs=[tmp_path / "out" / weird])]
    tasks += [gpufleet.Task(["sh", "-c", "sleep 0.2"]) for _ in range(20)]
    tasks += [gpufleet.Task(["touch", str(tmp_path / f"{weird}.{i}")], name=weird) for i in range(3)]
    rep = gpufleet.run(tasks, quiet=True, journal=tmp_path / "j.sqlite")
    assert rep.ok and rep.succeeded == 24, rep.summary()
    assert (tmp_path / "out" / weird).read_bytes() == b"data"
    assert all(os.path.exists(os.fsencode(tmp_path / f"{weird}.{i}")) for i in range(3))
    assert rep.tasks[-1].name == weird  # round-trips to the same str
    # the CLI, with the bytes in argv
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "gpufleet", "run", "--output", os.fsencode(out / "{/}"), "--",
                        "cp", "{}", "{output}", ":::", os.fsencode(tmp_path / weird)],
                       env=_stage_env(GPUFLEET_SIMULATED_GPUS="1"), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (out / weird).read_bytes() == b"data"


# ---- 5. log files per run ---------------------------------------------------------------------------

def test_log_files_are_per_run_and_numbered_like_parallel(sim_gpus, tmp_path):
    sim_gpus(1)
    logs = tmp_path / "logs"
    j = tmp_path / "j.sqlite"
    reports = []
    for word in ("first", "second"):
        tasks = [gpufleet.Task(["sh", "-c", f"echo {word} $0", str(i)]) for i in range(3)]
        reports.append(gpufleet.run(tasks, log_dir=logs, journal=j, quiet=True))
    for rep, word in zip(reports, ("first", "second")):
        assert rep.ok
        for t in rep.tasks:
            path = Path(t.log_path)
            assert path == logs / rep.run_id / f"task-{t.seq + 1}.attempt-1.log"
            assert path.read_text() == f"{word} {t.seq}\n"  # one task's output, one run's
    con = sqlite3.connect(j)
    rows = con.execute("SELECT argv, log_path FROM tasks").fetchall()
    con.close()
    assert len(rows) == 6
    for argv, log in rows:  # the journal points at the file of that task, in that run
        argv = json.loads(argv)
        assert Path(log).read_text() == f"{argv[2].split()[1]} {argv[3]}\n"


# ---- 6. descriptors of many runs ----------------------------------------------------------------------

def test_many_runs_in_one_process_leak_no_descriptor(tmp_path):
    script = textwrap.dedent(f"""
        import os, resource, gpufleet
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        gpufleet.simulate_gpus(2)
        counts = []
        for i in range(30):
            rep = gpufleet.run([gpufleet.Task(["true"]) for _ in range(4)], journal={str(tmp_path)!r} + "/j.sqlite",
                               quiet=True, log_dir={str(tmp_path)!r} + "/logs")
            assert rep.ok, rep.summary()
            counts.append(len(os.listdir("/proc/self/fd")))
        print(counts[2], counts[-1])
    """)
    r = subprocess.run([sys.executable, "-c", script], env=_stage_env(), capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    third, last = map(int, r.stdout.split())
    assert last == third


# ---- 7. a journal that is not one ---------------------------------------------------------------------

def test_a_file_that_is_not_a_journal_is_refused_untouched(sim_gpus, tmp_path):
    sim_gpus(1)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    other = tmp_path / "app.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    damaged = tmp_path / "damaged.sqlite"  # found by tests/fuzz/fuzz_journal: SQLite failed in the middle of opening
    damaged.write_bytes((Path(__file__).parents[1] / "fuzz/crashes/journal/malformed-schema-runtime-error-at-open")
                        .read_bytes())
    before = {p: p.read_bytes() for p in (notes, other)}
    for path, why in ((notes, "not a readable SQLite database"), (other, "has no table 'runs'"),
                      (damaged, "database disk image is malformed")):
        with pytest.raises(ValueError) as info:
            gpufleet.run([gpufleet.Task(["touch", str(tmp_path / "ran")])], journal=path, quiet=True)
        msg = str(info.value)
        assert str(path) in msg and why in msg and "gpufleet journal" in msg, msg
        r = _cli("run", "--journal", str(path), "--", "touch", str(tmp_path / "ran"), ":::", "1")
        assert r.returncode == 2 and b"Traceback" not in r.stderr and str(path).encode() in r.stderr, r.stderr
    assert not (tmp_path / "ran").exists()
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["app.db", "damaged.sqlite", "notes.txt"]  # no -wal/-shm left beside them


# ---- 11. resume after a crash between the rename and the journal record --------------------------------

def test_resume_trusts_an_output_renamed_in_the_crashed_run(sim_gpus, tmp_path):
    sim_gpus(1)
    out, ran, j = tmp_path / "out", tmp_path / "ran", tmp_path / "j.sqlite"
    tasks = [gpufleet.Task(["sh", "-c", 'echo $0 >> "$1"; printf done > "$2"', str(i), str(ran), "{output}"],
                           outputs=[out / f"{i}.txt"]) for i in range(3)]
    assert gpufleet.run(tasks, journal=j, quiet=True).ok
    # the state a SIGKILL leaves between the rename of task 0's output and its journal record ...
    con = sqlite3.connect(j)
    con.execute("UPDATE tasks SET state='running', end=NULL, exit_code=NULL WHERE outputs LIKE '%/0.txt%'")
    # ... and task 1: recorded running, its output older than the attempt (not made by it)
    con.execute("UPDATE tasks SET state='running', end=NULL, exit_code=NULL, start=start+1000 "
                "WHERE outputs LIKE '%/1.txt%'")
    con.commit()
    con.close()
    rep = gpufleet.run(tasks, journal=j, resume=True, quiet=True)
    assert rep.ok
    by_seq = sorted(rep.tasks, key=lambda t: t.seq)
    assert [t.status for t in by_seq] == ["skipped", "succeeded", "skipped"], [t.message for t in by_seq]
    assert "renamed into place" in by_seq[0].message
    assert ran.read_text().split() == ["0", "1", "2", "1"]  # only task 1 ran again
