"""The client side of the queue: connecting (starting the daemon when none runs), ``submit`` and
``Job``. Stdlib only, so that ``gpufleet submit`` starts fast (Note [Lazy package]).
"""
from __future__ import annotations

import os
import sys
import threading
import time

from .paths import QueueError, QueuePaths, check_client_dirs, locate
from .protocol import Connection

TYPE_CHECKING = False  # typing itself costs every `gpufleet submit` 6 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Iterable, Optional, Sequence, Union

    PathLike = Union[str, os.PathLike[str]]

__all__ = ["submit", "Job", "QueueError"]

# Set by the dispatcher for each job (and by the queue): never taken from the submitter's environment.
_RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_TASK_ID", "GPUFLEET_TASK_NAME",
                 "GPUFLEET_DEVICE", "GPUFLEET_SLOT", "GPUFLEET_ATTEMPT", "GPUFLEET_RUN_ID", "GPUFLEET_JOB_ID",
                 "GPUFLEET_QUEUE_JOB_ENV")


class QueueNotRunning(QueueError):
    """No daemon answers for this queue (and it was not to be started)."""


def _daemon_env() -> dict:
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    devices = sys.modules.get("gpufleet._devices")  # a simulation set with gpufleet.simulate_gpus() here
    sim = getattr(devices, "_sim_current", None)
    if sim is not None:
        env["GPUFLEET_SIMULATED_GPUS"] = sim
    return env


def start_daemon(paths: QueuePaths, options: Sequence[str] = ()) -> None:
    """Starts the queue's daemon in the background (or finds it started by someone else meanwhile);
    returns once it listens. Raises QueueError with the daemon's reason when it cannot start."""
    import subprocess

    argv = [sys.executable, "-m", "gpufleet.queue.daemon", "--detach", *options]
    if paths.group:
        argv += ["--group", paths.group]
    r = subprocess.run(argv, env=_daemon_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=300)
    if r.returncode != 0:
        text = r.stderr.decode(errors="replace").strip()
        raise QueueError(text.removeprefix("gpufleet queue: ")
                         or f"the queue daemon could not start (exit {r.returncode})")


def connect(paths: QueuePaths, autostart: bool = True) -> Connection:
    """A connection to the queue's daemon; a private queue's daemon is started when none runs and
    ``autostart`` (the first submit starts it, as task-spooler's first ``ts`` does)."""
    expect = os.geteuid() if paths.group is None else 0

    def attempt() -> Connection:
        try:
            os.lstat(paths.socket)
            check_client_dirs(paths)
            return Connection(paths.socket, expect)
        except PermissionError:  # Note [Who may use a queue]: a directory or socket closed to this user
            raise QueueError(f"permission denied: {paths.describe()} ({paths.runtime}) is not open to uid "
                             f"{os.geteuid()}") from None

    try:
        return attempt()
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    if not autostart or paths.group is not None:
        how = "gpufleet queue start" if paths.group is None else f"sudo gpufleet queue start --group {paths.group}"
        raise QueueNotRunning(f"{paths.describe()} is not running (start it with: {how})")
    start_daemon(paths)
    end = time.monotonic() + 30
    while True:
        try:
            return attempt()
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > end:
                raise QueueError(f"the queue daemon started but {paths.socket!r} does not answer (see "
                                 f"{paths.daemon_log})") from None
            time.sleep(0.02)


class _Clients:
    """One connection per queue per process (re-made after a fork or a lost daemon), one request at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.conns: dict = {}

    def reset(self) -> None:
        """Closes every connection (the next request connects again)."""
        with self.lock:
            for conn in self.conns.values():
                conn.close()
            self.conns.clear()

    def request(self, group: Optional[str], op: str, autostart: bool = False, **fields) -> dict:
        paths = locate(group)
        with self.lock:
            conn = self.conns.get(paths)
            if conn is not None and (conn.pid != os.getpid() or conn.closed_by_peer()):
                if conn.pid == os.getpid():
                    conn.close()
                conn = None
            fresh = conn is None
            if fresh:
                conn = self.conns[paths] = connect(paths, autostart)
            try:
                return self._send(conn, op, fields)
            except (ConnectionError, BrokenPipeError):
                self.conns.pop(paths, None)
                conn.close()
                if fresh or op == "submit":  # a submit may have been recorded: never send it twice
                    raise QueueError("the queue daemon went away during the request") from None
            conn = self.conns[paths] = connect(paths, autostart)  # the daemon was restarted since the last request
            return self._send(conn, op, fields)

    @staticmethod
    def _send(conn: Connection, op: str, fields: dict) -> dict:
        # A script submitting many jobs sends its environment (a few KiB) once per connection; later
        # submits with the same one say "same" (Note [Queue throughput] in runner.py).
        env = fields.get("env")
        if op == "submit" and env is not None and env == getattr(conn, "last_env", None):
            fields = dict(fields, env="same")
        reply = conn.request(op, **fields)
        if op == "submit" and env is not None:
            conn.last_env = env  # type: ignore[attr-defined]
        return reply


_clients = _Clients()


def request(op: str, group: Optional[str] = None, autostart: bool = False, **fields) -> dict:
    return _clients.request(group, op, autostart, **fields)


def job_message(cmd: Union[Sequence[PathLike], str], *, gpus: int = 1, min_free_memory: Union[int, str, None] = None,
                timeout: Optional[float] = None, retries: int = 0, outputs: Sequence[PathLike] = (),
                cwd: Optional[PathLike] = None, env: Optional[dict] = None, after: Iterable = (),
                after_previous: bool = False, priority: int = 0, name: Optional[str] = None,
                shell: bool = False) -> dict:
    """The submit request for a job: the caller's environment (with ``env`` on top) and directory
    travel with it. The daemon checks every field as ``gpufleet.Task`` does."""
    if shell:
        if not isinstance(cmd, str):
            raise TypeError(f"with shell=True, cmd must be one string for /bin/sh -c, got {cmd!r}")
    else:
        if isinstance(cmd, (str, bytes)):
            raise TypeError(f"cmd must be a list of arguments, got the string {cmd!r}; pass shell=True to run it "
                            "with /bin/sh -c")
        cmd = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in cmd]
    full_env = {k: v for k, v in os.environ.items() if k not in _RESERVED_ENV}
    for k, v in (env or {}).items():
        if k in _RESERVED_ENV:
            raise ValueError(f"env may not set {k}: the queue sets it for each job")
        full_env[k] = v
    base = os.getcwd() if cwd is None else os.path.abspath(os.fspath(cwd))
    deps = []
    for a in after:
        deps.append(a.id if isinstance(a, Job) else a)
    if isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    msg: dict = {"shell": shell, "cwd": base, "env": full_env, "gpus": gpus, "min_free_memory": min_free_memory,
                           "timeout": timeout, "retries": retries, "priority": priority, "name": name,
                           "outputs": [os.path.join(base, os.fspath(o)) for o in outputs], "after": deps,
                           "after_previous": after_previous}
    msg["cmd" if shell else "argv"] = cmd
    return msg


def submit(cmd: Union[Sequence[PathLike], str], *, gpus: int = 1, min_free_memory: Union[int, str, None] = None,
           timeout: Optional[float] = None, retries: int = 0, outputs: Sequence[PathLike] = (),
           cwd: Optional[PathLike] = None, env: Optional[dict] = None, after: Iterable = (), priority: int = 0,
           name: Optional[str] = None, shell: bool = False, group: Optional[str] = None) -> "Job":
    """Queues one command in the queue that outlives this process (``gpufleet submit``) and returns its
    ``Job``; the queue's daemon is started if none runs.

    ``cmd`` is an argv list (or one string with ``shell=True``). The job runs with this process's
    environment (``env`` adds or overrides variables) in ``cwd`` (default: the current directory).
    ``gpus``, ``min_free_memory``, ``timeout``, ``retries`` and ``outputs`` mean what they mean for
    ``gpufleet.Task``; ``after`` lists jobs (``Job`` or ids) that must succeed first (if one fails,
    this one ends as ``dependency_failed``); higher ``priority`` starts first. ``group`` names a
    shared group queue instead of this user's own.
    """
    msg = job_message(cmd, gpus=gpus, min_free_memory=min_free_memory, timeout=timeout, retries=retries,
                      outputs=outputs, cwd=cwd, env=env, after=after, priority=priority, name=name, shell=shell)
    return Job(request("submit", group, autostart=True, **msg)["id"], group=group)


class Job:
    """A job in the queue (from ``gpufleet.submit``, or ``Job(id)`` for one submitted elsewhere).

    Every property asks the daemon, so it is current: ``status`` (queued, running, retrying,
    succeeded, failed, timed_out, cancelled, dependency_failed), ``info`` (the whole record, as
    ``gpufleet ls --json`` shows it), ``exit_status``, ``log`` (the output of its latest attempt).
    """

    def __init__(self, id: int, group: Optional[str] = None):
        if isinstance(id, bool) or not isinstance(id, int) or id < 1:
            raise ValueError(f"a job id is a positive integer, got {id!r}")
        self.id = id
        self.group = group

    def __repr__(self) -> str:
        return f"Job({self.id})" if self.group is None else f"Job({self.id}, group={self.group!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Job) and (self.id, self.group) == (other.id, other.group)

    def __hash__(self) -> int:
        return hash((self.id, self.group))

    @property
    def info(self) -> dict:
        return request("ls", self.group, ids=[self.id])["jobs"][0]

    @property
    def status(self) -> str:
        return self.info["state"]

    @property
    def exit_status(self) -> Optional[int]:
        """As ``gpufleet wait`` returns it once the job ended (see ``wait``); None before."""
        return self.info["exit_status"]

    def wait(self, timeout: Optional[float] = None) -> int:
        """Blocks until the job ended; returns its exit status as task-spooler's ``ts -w`` does: the
        command's exit code, 128 + N after signal N, 124 after a timeout, 143 when cancelled, 125 when
        it never ran because a dependency failed. Raises TimeoutError after ``timeout`` seconds."""
        conn = connect(locate(self.group), autostart=False)  # its own connection: others may ask meanwhile
        try:
            r = conn.request("wait", ids=[self.id], timeout=timeout)
        finally:
            conn.close()
        rec = r["jobs"][0]
        if rec["exit_status"] is None:
            if r["stopping"]:
                raise QueueError(f"the queue daemon stopped before job {self.id} ended (it is {rec['state']}; the "
                                 "next start of the queue runs it)")
            raise TimeoutError(f"job {self.id} is still {rec['state']} after {timeout} s")
        return rec["exit_status"]

    def cancel(self) -> str:
        """Cancels the job (the kill sequence if it runs) and returns its final state ("cancelled", or the
        state it reached before the cancel came)."""
        return request("cancel", self.group, ids=[self.id])["jobs"][0]["state"]

    def retry(self) -> None:
        """Queues a job that ended again (its dependants that failed because of it too)."""
        request("retry", self.group, ids=[self.id])

    @property
    def log(self) -> str:
        """The output (stdout and stderr) of its latest attempt so far ("" before it started)."""
        data, offset = [], 0
        while True:
            r = request("tail", self.group, id=self.id, offset=offset)
            if not r["data"]:
                break
            data.append(os.fsencode(r["data"]))
            offset = r["offset"]
        return b"".join(data).decode("utf-8", "replace")
