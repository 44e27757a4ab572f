"""`gpufleet journal` on journals written by real `gpufleet run` runs: the runs, tasks by state, the
failed tasks with the tail of their last log, `--json`, `--run`, and clear errors for other files."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

import gpufleet

pytestmark = pytest.mark.timeout(120)


def _gpufleet(*args, cwd=None):
    env = dict(os.environ, GPUFLEET_SIMULATED_GPUS="2",
               PYTHONPATH=os.path.dirname(os.path.dirname(gpufleet.__file__)))
    return subprocess.run([sys.executable, "-m", "gpufleet", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=100)


SCRIPT = 'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "$1 line $i"; done; [ "$1" != c ] || [ -e fixed ]'


def test_journal_lists_runs_states_and_failures_with_their_log(tmp_path):
    run = ["run", "--journal", "j.sqlite", "--log-dir", "logs", "--retries", "1", "--", "sh", "-c", SCRIPT, "_",
           ":::", "a", "b", "c", "d"]
    r = _gpufleet(*run, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    first = _gpufleet("journal", "j.sqlite", "--json", "--tail", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout)
    assert len(info["runs"]) == 1 and info["runs"][0]["status"] == "finished"
    assert info["runs"][0]["attempts"] == {"failed": 2, "succeeded": 3}   # c ran twice (--retries 1)
    assert info["tasks"] == {"total": 4, "by_state": {"succeeded": 3, "failed": 1}}
    (f,) = info["failed"]
    assert f["name"] == "c" and f["attempts"] == 2 and f["exit_code"] == 1 and f["argv"][-1] == "c"
    assert f["log_path"].endswith("task-3.attempt-2.log")
    assert f["log_tail"] == "c line 10\nc line 11\nc line 12"
    text = _gpufleet("journal", "j.sqlite", cwd=tmp_path).stdout
    assert "tasks by state: succeeded 3, failed 1" in text
    assert "FAILED 'c' on cuda:" in text and "after 2 attempts" in text and "  | c line 12" in text
    assert "  | c line 2\n" not in text   # only the tail (10 lines by default)

    (tmp_path / "fixed").touch()
    r = _gpufleet(*run[:1], "--resume", *run[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(_gpufleet("journal", "j.sqlite", "--json", cwd=tmp_path).stdout)
    assert len(info["runs"]) == 2 and info["tasks"]["by_state"] == {"succeeded": 4} and info["failed"] == []
    second = info["runs"][1]["run_id"]
    only = json.loads(_gpufleet("journal", "j.sqlite", "--json", "--run", second, cwd=tmp_path).stdout)
    assert only["tasks"] == {"total": 1, "by_state": {"succeeded": 1}}   # only c ran again
    r = _gpufleet("journal", "j.sqlite", "--run", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "no such run" in r.stderr and second in r.stderr


def test_journal_of_a_killed_run_shows_running_tasks(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "gpufleet", "run", "--quiet", "--journal", "j.sqlite", "--", "sh", "-c",
                          "touch started.$1; sleep 60", "_", ":::", "x", "y"], cwd=tmp_path,
                         env=dict(os.environ, GPUFLEET_SIMULATED_GPUS="2",
                                  PYTHONPATH=os.path.dirname(os.path.dirname(gpufleet.__file__))))
    end = time.monotonic() + 60
    while not ((tmp_path / "started.x").exists() and (tmp_path / "started.y").exists()):
        assert time.monotonic() < end
        time.sleep(0.02)
    time.sleep(0.3)
    p.kill()
    p.wait()
    info = json.loads(_gpufleet("journal", "j.sqlite", "--json", cwd=tmp_path).stdout)
    assert info["runs"][0]["status"] == "running" and info["tasks"]["by_state"] == {"running": 2}
    assert "was killed before they ended" in _gpufleet("journal", "j.sqlite", cwd=tmp_path).stdout


def test_journal_errors_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database at all " * 100)
    r = _gpufleet("journal", "notes.txt", cwd=tmp_path)
    assert r.returncode == 2 and "'notes.txt' is not a gpufleet journal" in r.stderr
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t(x)").connection.commit()
    r = _gpufleet("journal", "other.db", cwd=tmp_path)
    assert r.returncode == 2 and "not a gpufleet journal (no runs/tasks/attempts tables)" in r.stderr
    r = _gpufleet("journal", "missing.sqlite", cwd=tmp_path)
    assert r.returncode == 2 and "no journal at 'missing.sqlite'" in r.stderr
    assert not (tmp_path / "missing.sqlite").exists()
