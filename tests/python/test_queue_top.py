"""`gpufleet top` driven in a real terminal multiplexer (tmux): the GPUs and the jobs drawn and
redrawn in place, a job's output shown with t, a running job cancelled with c then y."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from queue_helpers import make_queue, queue, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian: tmux)")


def test_top_shows_gpus_and_jobs_and_cancels_the_selected_job(queue, tmp_path):
    talker = queue.submit("sh", "-c", "echo hello from the job; sleep 60")
    sleeper = queue.submit("sleep", "60")
    waiting = queue.submit("sleep", "1")
    queue.wait_state(talker, "running")
    queue.wait_state(sleeper, "running")
    sock = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock, "-f", "/dev/null"]
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in queue.env.items() if k in ("PYTHONPATH", "GPUFLEET_QUEUE_DIR",
                                                                                 "PATH", "HOME"))
    status = tmp_path / "status"
    # COLUMNS and LINES would override the pane's size for curses
    cmd = (f"env -u COLUMNS -u LINES {env} {shlex.quote(sys.executable)} -m gpufleet top --interval 0.3; "
           f"echo $? > {status}")
    subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "30", cmd], check=True, timeout=30)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "0"], capture_output=True, text=True,
                              timeout=30).stdout

    def keys(*k) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "0", *k], check=True, timeout=30)

    def shows(pattern: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = screen()
            if re.search(pattern, s, re.M):
                return s
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared on the screen:\n{screen()}")

    try:
        s = shows(r"^> +%d +running" % talker)
        assert re.search(r"^cuda:0 .*Simulated GPU.*\d+\.\d/80\.0 GiB", s, re.M), s
        assert re.search(r"^cuda:1 ", s, re.M) and f"#{talker} " in s and f"#{sleeper} " in s
        assert re.search(r"^  %d +queued" % waiting, s, re.M), s
        stamps = {re.search(r"\d\d:\d\d:\d\d", s).group()}
        until(lambda: set(re.findall(r"\d\d:\d\d:\d\d", screen())) - stamps, 10, "a redraw")
        assert screen().count("ID  STATE") == 1  # redrawn in place, not scrolled
        keys("t")
        shows(r"output of job %d" % talker)
        assert "hello from the job" in shows("hello from the job")
        keys("Escape")
        shows(r"^> +%d +running" % talker)
        keys("Down")
        shows(r"^> +%d +running" % sleeper)
        keys("c")
        shows(r"cancel job %d\? y/n" % sleeper)
        keys("y")
        shows(r"job %d: cancelled" % sleeper)
        rec = queue.job(sleeper)
        assert rec["state"] == "cancelled" and "cancelled by root while it ran" in rec["message"]
        assert queue.job(talker)["state"] == "running"  # only the selected job
        shows(r"^. +%d +cancelled +143" % sleeper)
        keys("q")
        until(lambda: status.exists() and status.read_text().strip(), 20, "top to end")
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)


def test_top_needs_a_terminal(queue):
    queue.submit("true")
    r = queue.gf("top")
    assert r.returncode == 2 and "needs a terminal (gpufleet ls --watch refreshes plain text)" in r.stderr
