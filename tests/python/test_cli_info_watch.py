"""`gpufleet info --watch` driven in a real terminal multiplexer (tmux: refresh in place, Ctrl-C ends
it and leaves the last table), through a pipe (plain blocks, no escape codes) and as JSON lines; the
processes on each GPU with their user and command, for the pids the (simulated) NVML reports."""
from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import gpufleet

pytestmark = pytest.mark.timeout(120)
PKG = os.path.dirname(os.path.dirname(gpufleet.__file__))


@pytest.fixture
def busy_gpu():
    """A real process (with an awkward command line) that the simulated GPU 0 reports, as NVML would."""
    p = subprocess.Popen(["sleep", "300"])
    spec = [{"processes": [{"pid": p.pid, "used_memory": "3GiB"}, {"pid": 2 ** 22 + 12345}]}, {}]
    yield p, json.dumps(spec)
    p.kill()
    p.wait()


def _env(spec: str) -> dict:
    return dict(os.environ, GPUFLEET_SIMULATED_GPUS=spec, PYTHONPATH=PKG)


def test_processes_have_user_and_command(busy_gpu):
    proc, spec = busy_gpu
    r = subprocess.run([sys.executable, "-m", "gpufleet", "info", "--json"], env=_env(spec), capture_output=True,
                       text=True, timeout=60, check=True)
    procs = json.loads(r.stdout)["gpus"][0]["processes"]
    me = pwd.getpwuid(os.getuid()).pw_name
    assert procs[0] == {"pid": proc.pid, "used_memory": 3 << 30, "user": me, "command": "sleep 300"}
    assert procs[1]["user"] is None and procs[1]["command"] is None   # not in this PID namespace
    text = subprocess.run([sys.executable, "-m", "gpufleet", "info"], env=_env(spec), capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert re.search(rf"cuda:0\s+{proc.pid}\s+{me}\s+3.0 GiB\s+sleep 300", text), text


def test_watch_through_a_pipe_prints_plain_blocks(busy_gpu):
    _, spec = busy_gpu
    r = subprocess.run([sys.executable, "-m", "gpufleet", "info", "--watch", "0.2", "--count", "3"], env=_env(spec),
                       capture_output=True, text=True, timeout=60, check=True)
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert len(re.findall(r"^Every 0.2s: gpufleet info", r.stdout, re.M)) == 3
    assert r.stdout.count("Processes:") == 3
    r = subprocess.run([sys.executable, "-m", "gpufleet", "info", "--watch", "0.1", "--count", "2", "--json"],
                       env=_env(spec), capture_output=True, text=True, timeout=60, check=True)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(json.loads(ln)["gpus"][0]["processes"][0]["command"] == "sleep 300" for ln in lines)
    r = subprocess.run([sys.executable, "-m", "gpufleet", "info", "--watch", "0"], env=_env(spec), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--watch 0.0: expected a number of seconds > 0" in r.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian: tmux)")
def test_watch_in_tmux_refreshes_in_place_and_ctrl_c_ends_it(busy_gpu, tmp_path):
    _, spec = busy_gpu
    sock = str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock, "-f", "/dev/null"]
    status_file = tmp_path / "status"
    cmd = " ".join(["env", shlex.quote(f"GPUFLEET_SIMULATED_GPUS={spec}"), shlex.quote(f"PYTHONPATH={PKG}"),
                    shlex.quote(sys.executable), "-m", "gpufleet", "info", "--watch", "0.3",
                    ";", "echo", "$?", ">", shlex.quote(str(status_file))])
    subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "50", cmd], check=True, timeout=30)
    try:
        subprocess.run([*tmux, "set-option", "-t", "0", "remain-on-exit", "on"], check=True, timeout=30)  # keep the screen

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "0"], capture_output=True, text=True,
                                  timeout=30).stdout

        end = time.monotonic() + 60
        stamps = set()
        while len(stamps) < 3 and time.monotonic() < end:
            s = screen()
            stamps |= set(re.findall(r"gpufleet info\s+(\S+ \S+)", s))
            time.sleep(0.1)
        assert len(stamps) >= 2, screen()   # it refreshed (the clock moved) ...
        s = screen()
        assert s.count("Every 0.3s: gpufleet info") == 1 and s.count("Processes:") == 1, s   # ... in place
        assert s.lstrip().startswith("Every 0.3s") and "sleep 300" in s
        subprocess.run([*tmux, "send-keys", "-t", "0", "C-c"], check=True, timeout=30)
        end = time.monotonic() + 30
        while not status_file.exists() and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.1)
        assert status_file.read_text().strip() == "0"   # Ctrl-C ends a watch normally
        assert "Processes:" in screen() and "Traceback" not in screen()   # the last table stays
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
