"""`gpufleet run`'s GNU parallel options as real runs: stdin input, -j, --halt (exit statuses and the
jobs that ran compared with the real parallel through both joblogs), --joblog columns, --keep-order,
one 1-based numbering for the summary, the joblog and the log files, and the progress counts after a
drain and after a cancel, read from a real pseudo-terminal."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpufleet
from dispatch_helpers.terminal import Terminal

pytestmark = pytest.mark.timeout(180)
needs_parallel = pytest.mark.skipif(shutil.which("parallel") is None, reason="needs GNU parallel (Debian: parallel)")


def _env(sim="2", **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(gpufleet.__file__)), env.get("PYTHONPATH", "")])
    env["GPUFLEET_SIMULATED_GPUS"] = sim
    env.update(extra)
    return env


def _cli(*args, cwd=None, sim="2", stdin=None, **env):
    return subprocess.run([sys.executable, "-m", "gpufleet", "run", *args], env=_env(sim, **env), cwd=cwd,
                          capture_output=True, text=True, input=stdin, timeout=150)


@pytest.fixture
def exitwith(tmp_path) -> str:
    """A program that exits with its argument, or kills itself with the signal it names."""
    p = tmp_path / "exitwith"
    p.write_text('#!/bin/sh\ncase "$1" in [A-Z]*) kill -"$1" $$;; esac\nexit "$1"\n')
    p.chmod(0o755)
    return str(p)


def test_stdin_gives_one_task_per_line():
    r = _cli("--gpus", "0", "--", "echo", "{}", "{#}", stdin="x y\n\nz\n")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[]  2", "[x y] x y 1", "[z] z 3"]
    assert "3 tasks" in r.stderr


def test_jobs_sets_the_tasks_at_a_time(tmp_path):
    script = f'echo "$(date +%s.%N) 1" >> {tmp_path}/ev; sleep 1.2; echo "$(date +%s.%N) -1" >> {tmp_path}/ev'
    r = _cli("--quiet", "-j", "3", "--gpus", "0", "--", "sh", "-c", script, ":::", *"abcdef")
    assert r.returncode == 0, r.stderr
    events = sorted((float(t), int(d)) for t, d in (ln.split() for ln in (tmp_path / "ev").read_text().splitlines()))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 3
    r = _cli("--dry-run", "-j", "3", "--", "true", ":::", "a")   # 3 tasks at a time cannot fill 2 GPUs evenly
    assert r.returncode == 2 and "-j 3 with --gpus 1 on 2 GPUs" in r.stderr and "a multiple of 2" in r.stderr
    r = _cli("-j", "4", "--slots", "2", "--", "true", ":::", "a")
    assert r.returncode == 2 and "not both" in r.stderr
    r = _cli("-j", "x", "--", "true", ":::", "a")
    assert r.returncode == 2 and "-j 'x'" in r.stderr
    r = _cli("-j", "2", "--devices", "none", "--", "true", ":::", "a")
    assert r.returncode == 2 and "no GPU is visible" in r.stderr and "--gpus 0 runs CPU tasks" in r.stderr
    r = _cli("--dry-run", "--output", "o/{2}", "--", "cp", "{}", "{output}", ":::", "a")
    assert r.returncode == 2 and "uses {2} but there is 1 input source" in r.stderr


def _joblog_rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
    return [ln.split("\t") for ln in lines[1:]]


@needs_parallel
@pytest.mark.parametrize("halt,codes", [
    ("soon,fail=1", ["0", "0", "4", "0", "0"]),
    ("now,fail=1", ["0", "TERM", "0", "0"]),
    ("now,fail=2", ["1", "0", "2", "3", "0"]),
    ("soon,fail=50%", ["1", "0", "1", "0", "0", "0"]),
    ("now,success=2", ["1", "0", "0", "0"]),
    ("soon,done=3", ["1", "0", "5", "0", "0"]),
    ("2", ["0", "6", "0"]),
    ("never", ["0", "3", "0"]),
])
def test_halt_stops_and_exits_as_parallel(tmp_path, exitwith, halt, codes):
    r = _cli("--quiet", "-j", "1", "--gpus", "0", "--halt", halt, "--joblog", str(tmp_path / "ours"), "--", exitwith,
             ":::", *codes)
    p = subprocess.run(["parallel", "-j1", "--halt", halt, "--joblog", str(tmp_path / "theirs"), exitwith, ":::", *codes],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == p.returncode, (r.stderr, p.stderr)
    ours, theirs = _joblog_rows(tmp_path / "ours"), _joblog_rows(tmp_path / "theirs")
    # the same jobs ran, with the same exit values, signals and command lines
    assert [(x[0], x[6], x[7], x[8]) for x in ours] == [(x[0], x[6], x[7], x[8]) for x in theirs]
    for x in ours:
        assert x[1] == ":" and re.fullmatch(r"\d+\.\d{3}", x[2]) and re.fullmatch(r" *\d+\.\d{3}", x[3])
        assert len(x[3]) == 10 and x[4] == x[5] == "0"


def test_halt_now_cancels_running_tasks_and_says_so(tmp_path):
    r = _cli("--gpus", "0", "-j", "2", "--halt", "now,fail=1", "--kill-grace", "1", "--", "sh", "-c",
             'if [ "$1" = bad ]; then sleep 0.3; exit 9; fi; sleep 30', "_", ":::", "slow", "bad", "x", "y")
    assert r.returncode == 9, r.stderr
    assert "halted: --halt now,fail=1 reached at task #2 (failed): running tasks cancelled" in r.stderr
    assert "1 failed" in r.stderr and "1 cancelled" in r.stderr and "2 not started" in r.stderr
    assert "cancelled while running: #1" in r.stderr and "FAILED #1" not in r.stderr
    r = _cli("--halt", "sometimes", "--", "true", ":::", "a")
    assert r.returncode == 2 and "--halt 'sometimes' is not understood" in r.stderr


def test_joblog_to_stdout_with_signals_and_newlines(tmp_path, exitwith):
    r = _cli("--quiet", "--gpus", "0", "--joblog", "-", "--", exitwith, "{}", ":::", "0", "KILL")
    rows = sorted(ln.split("\t") for ln in r.stdout.splitlines()[1:])
    assert [(x[0], x[6], x[7], x[8]) for x in rows] == [("1", "0", "0", f"{exitwith} 0"), ("2", "0", "9", f"{exitwith} KILL")]
    r = _cli("--quiet", "--gpus", "0", "--joblog", str(tmp_path / "jl"), "--", "true", ":::", "a\nb")
    assert _joblog_rows(tmp_path / "jl")[0][8] == "true 'a\0b'"   # parallel writes a newline as NUL


def test_keep_order_prints_each_tasks_output_in_input_order(tmp_path):
    (tmp_path / "tmp").mkdir()
    r = _cli("--gpus", "0", "-j", "4", "-k", "--retries", "1", "--", "sh", "-c",
             'sleep "$1"; echo "first $1"; printf "second $1"; [ "$1" != 0.2 ] || [ -e flag ] || { touch flag; exit 1; }',
             "_", ":::", "0.6", "0.4", "0.2", "0", cwd=tmp_path, TMPDIR=str(tmp_path / "tmp"))
    assert r.returncode == 0, r.stderr
    # 0.2 failed once: as in parallel, only its last attempt's output is printed
    assert r.stdout.splitlines() == ["[0.6] first 0.6", "[0.6] second 0.6", "[0.4] first 0.4", "[0.4] second 0.4",
                                     "[0.2] first 0.2", "[0.2] second 0.2", "[0] first 0", "[0] second 0"]
    assert not list((tmp_path / "tmp").iterdir())   # the temporary log files are gone (they were printed)
    if shutil.which("parallel"):   # the same lines as parallel -k prints, less gpufleet's prefix
        (tmp_path / "p").mkdir()
        p = subprocess.run(["parallel", "-k", "-j4", "--retries", "2", "sh", "-c", "'sleep \"$1\"; echo \"first $1\"; "
                            "printf \"second $1\"; [ \"$1\" != 0.2 ] || [ -e flag ] || { touch flag; exit 1; }'", "_",
                            ":::", "0.6", "0.4", "0.2", "0"], cwd=tmp_path / "p", capture_output=True, text=True,
                           timeout=60)
        ours = [ln.split("] ", 1)[1] for ln in r.stdout.splitlines()]
        # gpufleet ends a last line that has no newline with one (a prefixed line never runs into the next)
        assert p.stdout == "".join(ln + ("" if ln.startswith("second") else "\n") for ln in ours)


def test_one_numbering_for_summary_joblog_log_files_and_the_task_id_variable(tmp_path):
    r = _cli("--gpus", "0", "--log-dir", str(tmp_path / "logs"), "--joblog", str(tmp_path / "jl"), "--", "sh", "-c",
             'echo "output of $1 ($GPUFLEET_TASK_ID $2)"; [ "$1" != c ]', "_", "{}", "{#}", ":::", "a", "b", "c", "d")
    assert r.returncode == 1
    m = re.search(r"FAILED #(\d+) 'c': .*\(log: (.*)\)", r.stderr)
    assert m and m.group(1) == "3", r.stderr
    log = Path(m.group(2))
    assert log.name == "task-3.attempt-1.log" and log.read_text() == "output of c (3 3)\n"  # GPUFLEET_TASK_ID is {#}
    run_id = re.search(r"gpufleet run (\w+):", r.stderr).group(1)
    assert log.parent == tmp_path / "logs" / run_id
    assert {x[0]: x[6] for x in _joblog_rows(tmp_path / "jl")}["3"] == "1"
    assert sorted(p.name for p in log.parent.iterdir()) == [f"task-{n}.attempt-1.log" for n in range(1, 5)]


def _bar_line(term: Terminal) -> str:
    lines = [ln for ln in term.screen_lines() if ln.startswith("gpufleet:") and "|" in ln]
    assert lines, term.text
    return lines[-1]


@pytest.mark.parametrize("ctrl_c", [1, 2], ids=["drain", "cancel"])
def test_progress_counts_after_drain_and_cancel_in_a_terminal(tmp_path, ctrl_c):
    # tasks 1-2 end at once; 3-4 wait for a release file, so the Ctrl-C lands while exactly they run
    script = (f'if [ "$1" -le 2 ]; then exit 0; fi; touch {tmp_path}/started.$1; '
              f'while [ ! -e {tmp_path}/release ]; do sleep 0.05; done')
    term = Terminal([sys.executable, "-m", "gpufleet", "run", "--devices", "none", "--gpus", "0", "-j", "2",
                     "--kill-grace", "2", "--", "sh", "-c", script, "_", ":::", *[str(i) for i in range(1, 11)]],
                    env=_env(GPUFLEET_PROGRESS_INTERVAL="0.1"), cwd=tmp_path)
    try:
        end = time.monotonic() + 60
        while not ((tmp_path / "started.3").exists() and (tmp_path / "started.4").exists()):
            assert time.monotonic() < end and term.poll() is None, term.text
            time.sleep(0.02)
        term.wait_for(r"/10 ")  # the bar is drawn, with its total
        term.send(b"\x03")
        term.wait_for("draining")
        if ctrl_c == 2:
            term.send(b"\x03")
            term.wait_for("cancelling")
        else:
            (tmp_path / "release").touch()
        assert term.wait(60) == 130
    finally:
        term.close()
    bar = _bar_line(term)
    assert "4/10" in bar and "not started 6" in bar, bar
    text = term.text
    if ctrl_c == 1:
        assert "ok 4, failed 0" in bar and "cancelled" not in bar
        assert "4 succeeded, 0 failed, 0 timed out, 0 cancelled, 0 skipped, 6 not started" in text
    else:
        assert "ok 2, failed 0, cancelled 2" in bar, bar
        assert "2 succeeded, 0 failed, 0 timed out, 2 cancelled, 0 skipped, 6 not started" in text
        assert "cancelled while running: #3, #4" in text and "FAILED" not in text


def test_progress_total_and_eta_for_known_inputs(tmp_path):
    (tmp_path / "list").write_text("".join(f"{i}\n" for i in range(6)))
    term = Terminal([sys.executable, "-m", "gpufleet", "run", "--devices", "none", "--gpus", "0", "-j", "2", "--",
                     "sh", "-c", "sleep 0.3", "::::", "list", ":::", "a", "b"], env=_env(), cwd=tmp_path)
    try:
        assert term.wait(60) == 0
    finally:
        term.close()
    lines = [ln for ln in term.screen_lines() if "/12 " in ln]
    assert lines and "12/12" in lines[-1] and "ok 12" in lines[-1], term.text
    assert any(re.search(r"<\d\d:\d\d", ln) for ln in lines[:-1]), lines   # tqdm's ETA while running


def test_halt_and_counts_from_python(sim_gpus, tmp_path):
    sim_gpus(1)
    tasks = [gpufleet.Task(["sh", "-c", "exit 0"], gpus=0), gpufleet.Task(["sh", "-c", "exit 5"], gpus=0),
             gpufleet.Task(["sh", "-c", "exit 0"], gpus=0)]
    rep = gpufleet.run(tasks, cpu_slots=1, quiet=True, halt="soon,fail=1")
    assert rep.halt_exit_status == 5 and "reached at task #2 (failed)" in rep.halted
    assert rep.counts["not_started"] == 1 and rep.failed == 1 and not rep.ok
    assert [t.number for t in rep.tasks] == [1, 2, 3] and [t.seq for t in rep.tasks] == [0, 1, 2]
    with pytest.raises(ValueError, match="percentage of the tasks, so it needs their number"):
        gpufleet.run(iter(tasks), quiet=True, halt="now,fail=10%")
    with pytest.raises(ValueError, match="'now,fial=1' is not understood"):
        gpufleet.run(tasks, quiet=True, halt="now,fial=1")
    # a cancel is not a failure: counted apart, listed apart, and no device is blamed for it
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", "exit 3"]), gpufleet.Task(["sleep", "30"])], quiet=True,
                       halt="now,fail=1", kill_grace=1)
    assert rep.counts["failed"] == 1 and rep.counts["cancelled"] + rep.counts["not_started"] == 1
    assert rep.failed == 1 and [t.status for t in rep.failed_tasks] == ["failed"]
    assert rep.devices["cuda:0"]["failures"] == 1
