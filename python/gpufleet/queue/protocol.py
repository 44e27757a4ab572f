"""The queue's wire format: one JSON object per line over a Unix stream socket, a reply per request.

A request is ``{"op": NAME, ...}``; a reply ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``.
Text that names files or reaches commands may hold bytes that are not UTF-8 (legal on Linux): such
strings travel as Python decodes them (``os.fsdecode``, surrogate escapes), which ``json`` writes
as ``\\udcXX`` escapes and reads back unchanged. Stdlib only: clients import this on every
``gpufleet submit`` (Note [Lazy package] in gpufleet/__init__.py).
"""
from __future__ import annotations

import json
import os
import socket
import struct

from .paths import QueueError

TYPE_CHECKING = False  # typing itself costs every `gpufleet submit` 6 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Any, Optional

MAX_MESSAGE = 64 << 20  # a request or reply larger than this is refused (a client gone mad, not a job)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


def read_message(f) -> Optional[dict]:
    """The next message from the buffered reader ``f``; None at end of stream."""
    line = f.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise QueueError(f"a message longer than {MAX_MESSAGE >> 20} MiB or cut short")
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise QueueError(f"a message that is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise QueueError("a message that is not a JSON object")
    return msg


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


class Connection:
    """A client's connection to a daemon: ``request(op, **fields)`` returns the reply's fields or
    raises QueueError with the daemon's message."""

    def __init__(self, path: str, expect_uid: int, timeout: Optional[float] = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            _, uid, _ = peer_credentials(self.sock)
            if uid != expect_uid:  # Note [Who may use a queue]: say nothing to an impostor
                raise QueueError(f"the process behind {path!r} runs as uid {uid}, not {expect_uid}: refusing to use it")
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")
        self.pid = os.getpid()

    def closed_by_peer(self) -> bool:
        """Whether the daemon has closed this connection (it stopped or was restarted since)."""
        import select

        if not select.select([self.sock], [], [], 0)[0]:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def request(self, op: str, **fields) -> dict:
        self.sock.sendall(encode({"op": op, **fields}))
        reply = read_message(self.reader)
        if reply is None:
            raise ConnectionResetError("the queue daemon closed the connection (it stopped, or was killed)")
        if not reply.get("ok"):
            kind = {"ValueError": ValueError, "TypeError": TypeError}.get(reply.get("kind"), QueueError)
            raise kind(reply.get("error") or "the queue daemon refused the request")
        return reply

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()
