"""A real pseudo-terminal for CLI tests: the program runs as the foreground process group of its own
terminal session, so Ctrl-C typed as ``\\x03`` reaches it as the terminal's SIGINT, and the bytes it
draws (tqdm's carriage returns, cursor codes) come back as a terminal would receive them."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import termios
import threading
import time

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Terminal:
    def __init__(self, argv: list[str], env: dict, cwd=None, rows: int = 40, cols: int = 200):
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                if cwd:
                    os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.raw = b""
        self.status = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self.raw += chunk

    @property
    def text(self) -> str:
        """Everything received, escape codes removed (carriage returns kept)."""
        with self._lock:
            raw = self.raw
        return _ANSI.sub("", raw.decode("utf-8", "replace"))

    def screen_lines(self) -> list[str]:
        """The received text cut at carriage returns and newlines: each redraw of a line is one entry."""
        return [s for s in re.split(r"[\r\n]+", self.text) if s.strip()]

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.poll() is not None:
                break
            time.sleep(0.02)
        m = re.search(pattern, self.text)
        if m:
            return m
        raise AssertionError(f"{pattern!r} never appeared; the terminal shows:\n{self.text}")

    def poll(self):
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status

    def wait(self, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"still running after {timeout} s; the terminal shows:\n{self.text}")
            time.sleep(0.02)
        self._reader.join(timeout=5)
        return self.status

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def close(self) -> None:
        self.kill()
        try:
            os.close(self.fd)
        except OSError:
            pass
