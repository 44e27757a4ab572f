"""The queue daemon: ``python -m gpufleet.queue.daemon [--detach] [--group NAME] [--slots N] ...``.

One per queue (a flock on its database's lock file); started by ``gpufleet queue start`` or by the
first ``gpufleet submit`` (``--detach``: it forks, leaves the terminal's session and says "ready"
through a pipe once its socket listens, so the submitter connects to a daemon that is up, or prints
why it could not start). It runs one dispatcher for its whole life (runner.py), answers requests on
the socket (requests.py), and ends on ``gpufleet queue stop`` or SIGTERM: running jobs get the kill
sequence and are queued again, or, with ``--drain``, finish first.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socketserver
import sys
import threading
import time
import traceback
from typing import Optional

from .paths import QueueError, QueuePaths, ensure_dir, group_id, locate
from .protocol import encode, peer_credentials, read_message
from .settings import DEFAULTS, add_settings, settings_from

# The daemon's own environment is cut down to these before its dispatcher starts: a job gets the
# environment of whoever submitted it (sent with the job) over this base, not the variables of the
# shell that happened to start the daemon days earlier.
_BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
             "GPUFLEET_SIMULATED_GPUS", "GPUFLEET_DISABLE_NVML", "GPUFLEET_NVML_LIBRARY", "CUDA_VISIBLE_DEVICES",
             "CUDA_DEVICE_ORDER")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        q = self.server.queue  # type: ignore[attr-defined]
        conn: dict = {}
        while True:
            try:
                msg = read_message(self.rfile)
            except QueueError as e:
                self.wfile.write(encode({"ok": False, "error": f"bad request: {e}"}))
                return
            except OSError:
                return
            if msg is None:
                return
            try:
                _, uid, _ = peer_credentials(self.connection)  # every request: Note [Who may use a queue]
                reply = q.requests.handle(msg, uid, conn)
            except (QueueError, ValueError, TypeError) as e:  # the client raises the same kind (bad input: ValueError)
                reply = {"ok": False, "error": str(e), "kind": type(e).__name__}
            except Exception as e:  # a bug: said to the client and logged, the daemon goes on
                q.log("request failed:\n" + traceback.format_exc())
                reply = {"ok": False, "error": f"internal error in the queue daemon: {type(e).__name__}: {e}"}
            try:
                self.wfile.write(encode(reply))
            except OSError:
                return


class Daemon:
    def __init__(self, paths: QueuePaths, settings: dict):
        self.paths, self.group = paths, paths.group
        self.uid = os.geteuid()
        self.requested = settings
        self.settings: dict = {}
        self.cond = threading.Condition()
        self.stop_lock = threading.Lock()
        self.stop_done = threading.Event()
        self.stop_result: Optional[dict] = None
        self.log_file = None
        self._members: dict = {}

    # ---- logging, authorisation, notification -------------------------------------------------------

    def log(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {text}\n"
        f = self.log_file or sys.stderr
        try:
            f.write(line)
            f.flush()
        except (OSError, ValueError):
            pass

    def authorize(self, uid: int) -> None:
        """Note [Who may use a queue]: the owner, or in a group queue also root and the group's members."""
        if uid == self.uid:
            return
        if self.group is None:
            raise QueueError(f"permission denied: this is the private queue of uid {self.uid}")
        if uid == 0 or self._member(uid):
            return
        raise QueueError(f"permission denied: uid {uid} is not a member of the group {self.group!r} of this queue")

    def _member(self, uid: int) -> bool:
        import pwd

        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return False
        return group_id(self.group) in os.getgrouplist(pw.pw_name, pw.pw_gid)

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_final(self, ids: list, timeout: Optional[float]) -> list:
        """The records of ``ids`` once every one has ended, or when ``timeout`` passed or the daemon stops."""
        from .store import FINAL

        end = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                recs = self.store.records(ids)
                if all(r["state"] in FINAL for r in recs) or not self.runner.thread.is_alive():
                    return recs
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return recs
                self.cond.wait(1.0 if left is None else min(1.0, left))

    # ---- life -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to a listening socket. Raises QueueError with the reason it cannot start."""
        import gc

        # Requests and events allocate many small acyclic objects: the cycle collector's default pace
        # cost 3 % of the daemon's time under a submit storm (Note [Queue throughput] in runner.py).
        gc.set_threshold(50_000, 20, 20)
        from .. import _core, _dispatch
        from .runner import Runner, load_backlog, recover
        from .store import Store

        os.umask(0o077)
        for d in {self.paths.runtime, self.paths.state}:
            ensure_dir(d, self.paths)
        os.makedirs(self.paths.logs, mode=0o700, exist_ok=True)
        self.log_file = open(self.paths.daemon_log, "a")
        for k in list(os.environ):
            if k not in _BASE_ENV and not k.startswith("LC_"):
                del os.environ[k]
        try:
            _core.init_journal(self.paths.journal)
        except ValueError as e:
            raise QueueError(str(e)) from None
        self.store = Store(self.paths.db)
        stored = self.store.meta("settings", {}) or {}
        self.settings = {k: next((v for v in (self.requested.get(k), stored.get(k)) if v is not None), default)
                         for k, default in DEFAULTS.items()}
        spec, count = self.settings["devices"], _core.device_count()
        ordinals = list(range(count)) if spec == "auto" else _dispatch._resolve_devices(spec)
        bad = [o for o in ordinals if o >= count]
        if bad:
            raise QueueError(f"--devices {spec}: cuda:{bad[0]} is not visible here ({count} GPUs visible)")
        counts = recover(self.store, self.paths.journal, float(self.settings["kill_grace"]), self.log)
        if any(counts.values()):
            self.log(f"recovered the previous daemon's jobs: {counts}")
        self.backlog = load_backlog(self.store)
        self.runner = Runner(self.store, self.backlog, ordinals, self.settings, self.paths.logs, self.paths.journal,
                             self.group is not None and self.uid == 0, self.changed, self.log)
        with self.store.tx() as db:
            self.store.set_meta(db, "settings", self.settings)
        from .requests import Requests

        self.requests = Requests(self)
        self._listen()
        self.log(f"queue daemon started: pid {os.getpid()}, devices {self.runner.names or 'none'}, "
                 f"{self.settings['slots']} slot(s) per GPU, run {self.runner.d.run_id}")

    def _listen(self) -> None:
        sock = self.paths.socket
        if os.path.lexists(sock):
            os.unlink(sock)  # a dead daemon's (we hold the lock: no live daemon has it)
        self.server = _Server(sock, _Handler, bind_and_activate=False)
        self.server.queue = self  # type: ignore[attr-defined]
        self.server.server_bind()
        if self.group is not None:
            os.chown(sock, 0, group_id(self.group))
            os.chmod(sock, 0o660)
        else:
            os.chmod(sock, 0o600)
        self.server.server_activate()
        self.sock_ino = os.stat(sock).st_ino

    def serve(self) -> None:
        """Until the dispatcher's run ends (stop, or an error): requests on other threads, signals here."""
        threading.Thread(target=self.server.serve_forever, args=(0.05,), name="gpufleet-queue-server",
                         daemon=True).start()
        self.runner.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, args=(False,), daemon=True).start())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while self.runner.thread.is_alive():
            self.runner.thread.join(0.5)
        if self.stop_lock.locked():
            self.stop_done.wait(30)
            time.sleep(0.05)  # the stop request's reply is on its way
        self.server.shutdown()
        self.server.server_close()
        try:
            if os.stat(self.paths.socket).st_ino == self.sock_ino:
                os.unlink(self.paths.socket)
        except OSError:
            pass
        self.log("queue daemon stopped" + (f" after an error: {self.runner.error}" if self.runner.error else ""))
        self.store.close()

    def stop(self, drain: bool) -> dict:
        """Ends the daemon (one stop at a time; a second request waits for the first and gets its answer)."""
        with self.stop_lock:
            if self.stop_result is None:
                before = self._running()
                self.log("stopping: " + ("running jobs finish first" if drain else "running jobs are stopped and "
                                                                                    "queued again"))
                self.runner.stop(drain)
                self.runner.thread.join()
                after = self._running()
                self.stop_result = {"stopped": True, "drained": drain, "requeued": sorted(before - after)
                                    if not drain else []}
                self.changed()
            self.stop_done.set()
            return dict(self.stop_result)

    def _running(self) -> set:
        with self.store.lock:
            return {i for (i,) in self.store.db.execute("SELECT id FROM jobs WHERE state IN ('running','retrying')")}


def _acquire_lock(paths: QueuePaths):
    """The flock that makes this the queue's one daemon; None (and the holder's pid) when another has it."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, None


def run(paths: QueuePaths, settings: dict, ready=None) -> int:
    """The daemon's life in this process. ``ready(text)`` is called once: "ready", "running PID" (another
    daemon has the queue) or "error: ..."."""
    say = ready or (lambda text: print(f"gpufleet queue: {text}", file=sys.stderr))
    if paths.group is not None and os.geteuid() != 0:  # before anything is created
        say(f"error: a group queue runs each job as the user who submitted it, so root must start it (sudo gpufleet "
            f"queue start --group {paths.group}); a private queue needs no root")
        return 1
    try:
        for d in {paths.runtime, paths.state}:
            ensure_dir(d, paths)
        fd, holder = _acquire_lock(paths)
        if fd is None:
            say(f"running {holder}")
            return 0
        daemon = Daemon(paths, settings)
        daemon.start()
    except (QueueError, ValueError, OSError) as e:
        say(f"error: {e}")
        return 1
    except Exception as e:  # a bug: the reason still reaches whoever started the daemon
        say(f"error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return 1
    say("ready")
    try:
        daemon.serve()
    finally:
        os.close(fd)
    return 1 if daemon.runner.error else 0


def _detach(paths: QueuePaths, settings: dict) -> int:
    """Forks the daemon out of this session; returns once it listens (0) or failed (1, reason on stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

        def ready(text: str) -> None:
            try:
                os.write(w, text.encode() + b"\n")
                os.close(w)
            except OSError:
                pass

        code = 1
        try:
            code = run(paths, settings, ready)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    text = b"".join(chunks).decode(errors="replace").strip()
    if text == "ready" or text.startswith("running"):
        return 0
    print(f"gpufleet queue: {text or 'the daemon ended before it was ready'} (see {paths.daemon_log})",
          file=sys.stderr)
    return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpufleet.queue.daemon", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detach", action="store_true", help="fork into the background, return once it listens")
    add_settings(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        paths = locate(args.group)
        settings = settings_from(args)
    except (ValueError, QueueError) as e:
        print(f"gpufleet queue: error: {e}", file=sys.stderr)
        return 2
    if args.detach:
        return _detach(paths, settings)
    return run(paths, settings)


if __name__ == "__main__":
    sys.exit(main())
