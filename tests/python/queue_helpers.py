"""A real queue for the queue tests: its own directory (GPUFLEET_QUEUE_DIR, short: a socket path has
at most 107 bytes), simulated GPUs for its daemon, the CLI run as `python -m gpufleet` in child
processes, and a teardown that stops the daemon and checks that it left no process behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from dispatch_helpers.proc_utils import stage_env, wait_for

import gpufleet
from gpufleet import _core
from gpufleet.queue import client as queue_client


class Queue:
    def __init__(self, gpus: str = "2"):
        self.dir = tempfile.mkdtemp(prefix="gfq-", dir="/tmp")
        self.group = None  # a test that makes it a group queue says so (the teardown stops it)
        self.env = stage_env(GPUFLEET_QUEUE_DIR=self.dir, GPUFLEET_SIMULATED_GPUS=gpus)
        for k in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "GPUFLEET_QUEUE_GROUP"):
            self.env.pop(k, None)

    def gf(self, *args, timeout: float = 120, env: dict = None, cwd=None, check: bool = False):
        """`gpufleet ARGS...` in a child process; the CompletedProcess (text)."""
        r = subprocess.run([sys.executable, "-m", "gpufleet", *map(str, args)], env={**self.env, **(env or {})},
                           cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"gpufleet {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, *cmd, opts=(), **kw) -> int:
        r = self.gf("submit", *opts, "--", *cmd, check=True, **kw)
        return int(r.stdout.strip())

    def ls(self, *ids) -> list:
        return json.loads(self.gf("ls", "--json", *ids, check=True).stdout)["jobs"]

    def job(self, jid: int) -> dict:
        return self.ls(jid)[0]

    def wait_state(self, jid: int, states, timeout: float = 60) -> dict:
        states = (states,) if isinstance(states, str) else states
        assert wait_for(lambda: self.job(jid)["state"] in states, timeout), self.job(jid)
        return self.job(jid)

    def daemon_pid(self):
        """The pid holding the queue's lock (None when no daemon runs)."""
        try:
            with open(os.path.join(self.dir, "daemon.lock")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"gpufleet.queue.daemon" in f.read() else None

    def marker(self):
        import sqlite3

        db = sqlite3.connect(os.path.join(self.dir, "queue.sqlite"))
        try:
            row = db.execute("SELECT value FROM meta WHERE key='marker'").fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row else ""

    def close(self) -> None:
        pid = self.daemon_pid()
        if pid is not None:
            self.gf("queue", "stop", *(["--group", self.group] if self.group else []), timeout=60)
            if not wait_for(lambda: self.daemon_pid() is None, 30):
                os.kill(pid, signal.SIGKILL)
        if os.path.exists(os.path.join(self.dir, "queue.sqlite")):
            marker = self.marker()
            leftover = _core.kill_marked_processes(marker, 0) if marker else 0
            if leftover:
                _core.kill_marked_processes(marker, signal.SIGKILL)
            assert leftover == 0, f"{leftover} processes of the queue's last run outlived its daemon"
        queue_client._clients.reset()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def make_queue():
    made = []

    def make(gpus: str = "2") -> Queue:
        q = Queue(gpus)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


@pytest.fixture
def queue(make_queue) -> Queue:
    return make_queue()


@pytest.fixture
def api_queue(make_queue, monkeypatch) -> Queue:
    """A queue this process's gpufleet.submit() talks to (its daemon started by the first submit)."""
    q = make_queue()
    for k in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "GPUFLEET_QUEUE_GROUP"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GPUFLEET_QUEUE_DIR", q.dir)
    monkeypatch.setenv("PYTHONPATH", q.env["PYTHONPATH"])
    gpufleet.simulate_gpus(2)
    return q


def lines(path) -> list:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def until(pred, timeout: float = 60, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or pred}")
