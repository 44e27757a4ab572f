"""The shared progress display (Note [Progress modes] in python/gpufleet/_progress.py)."""
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from gpufleet import _progress


def test_plain_mode_for_a_pipe_prints_whole_lines_without_escape_codes():
    buf = io.StringIO()
    bar = _progress.Bar(total=10, desc="demo", unit="task", file=buf, status_lines=1, interval=3600)
    assert bar.mode == "plain"
    for i in range(10):
        bar.set_line(0, f"cuda:0 [{i}/2]")
        bar.update(1)
    assert buf.getvalue() == ""  # nothing before the interval has passed
    bar.refresh(force=True)
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("demo: 10/10 task (100%)"), lines
    assert lines[1] == "  cuda:0 [9/2]"
    assert len(lines) == 4  # the forced block and the closing block


def test_plain_mode_eta_and_unknown_total():
    buf = io.StringIO()
    bar = _progress.Bar(total=4, desc="x", unit="call", file=buf, interval=3600)
    bar.update(1)
    line = bar.plain_line()
    assert "1/4 call (25%)" in line and "ETA" in line
    bar2 = _progress.Bar(total=None, desc="y", unit="it", file=buf, interval=3600)
    bar2.update(3)
    assert bar2.plain_line().startswith("y: 3 it ") and "ETA" not in bar2.plain_line()


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "inf", "nan"])
def test_bad_interval_names_the_value(monkeypatch, raw):
    monkeypatch.setenv("GPUFLEET_PROGRESS_INTERVAL", raw)
    with pytest.raises(ValueError, match=f"GPUFLEET_PROGRESS_INTERVAL={raw!r}"):
        _progress.interval_from_env()


def test_terminal_mode_in_a_real_pty_draws_a_tqdm_bar():
    code = ("import sys; from gpufleet import _progress as p; b = p.Bar(total=3, desc='t', unit='x');"
            "print(b.mode, file=sys.stderr); [b.update(1) for _ in range(3)]; b.close()")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
        os.execve(sys.executable, [sys.executable, "-c", code], os.environ)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "terminal" in text
    assert "\r" in text and "3/3" in text


def test_plain_mode_in_a_subprocess_pipe():
    code = ("from gpufleet import _progress as p; b = p.Bar(total=2, desc='job', unit='task');"
            "b.update(2); b.close()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "GPUFLEET_PROGRESS_INTERVAL": "0.01"})
    assert r.stderr.startswith("job: 2/2 task (100%)")
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
