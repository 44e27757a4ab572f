"""Messages between a ``GPUExecutor`` and its workers, with large buffers in shared memory.

Note [Out-of-band buffers]: a message is a small header plus, optionally, a ``Payload`` pickled
by ``_serialize`` (Note [Callables by value]) whose buffers of at least ``THRESHOLD`` bytes (NumPy
arrays, ``pickle.PickleBuffer``; pickle keeps ``bytes`` in band) were taken out of band. Those go
into one file under /dev/shm, and only the header, the pickle and the buffers' places go through
the pipe: one copy into the file instead of pickling, pipe and unpickling copies. The receiver maps
the file copy-on-write, so the arrays it gets are writable and what it writes stays its own (as with
a pickled copy); it unlinks the name at once, and the arrays keep the mapping alive for as long as
they live. The space is reserved with ``posix_fallocate``, so a full /dev/shm (containers often have
64 MB) is an ``OSError`` at send time, never a SIGBUS later; the message then goes in band, as does
everything where /dev/shm is missing. Names start with ``gpufleet-<owner pid>-``, the executor's pid,
which removes what is left (a worker killed between send and receive) when it shuts down.

The payload is unpickled by the receiver itself (``Received.load``), so a payload that fails to
unpickle is that message's failure (the call's), never the connection's.
"""
from __future__ import annotations

import glob
import itertools
import mmap
import os
import pickle
from typing import Any, Optional

from ._serialize import THRESHOLD, Payload, loads

_ALIGN = 64
_counter = itertools.count()


def shm_dir() -> str:
    return os.environ.get("GPUFLEET_IPC_DIR", "/dev/shm")


class Received:
    """A payload as it arrived: the pickle and views of its out-of-band buffers."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: list):
        self.data, self.buffers = data, buffers

    def load(self) -> Any:
        return loads(self.data, self.buffers)


class LoadError(RuntimeError):
    """A message arrived but its shared-memory file could not be read (the connection is fine);
    ``header`` is the message's header."""

    def __init__(self, message: str, header: Any = None):
        super().__init__(message)
        self.header = header


class Channel:
    """One direction pair of ``multiprocessing`` connections (a reader and a writer); ``owner``
    names (and cleans up) the shared-memory files of the messages sent."""

    def __init__(self, reader, writer, owner: int):
        self.reader, self.writer, self.owner = reader, writer, owner

    def send(self, header: Any, payload: Optional[Payload] = None) -> Optional[str]:
        """Sends ``header`` and ``payload``; returns the path of the file holding the payload's large
        buffers (the receiver removes it), or None."""
        if payload is None:
            self.writer.send((header, None, None, None))
            return None
        path, places = self._to_file(payload) if payload.buffers else (None, None)
        if payload.buffers and path is None:  # no shared memory: the buffers go in band
            data = pickle.dumps(loads(payload.data, payload.buffers), protocol=5)
            self.writer.send((header, data, None, None))
            return None
        try:
            self.writer.send((header, payload.data, places, path))
        except BaseException:
            discard(path)
            raise
        return path

    def _to_file(self, payload: Payload):
        places, off = [], 0
        for pb in payload.buffers:
            n = pb.raw().nbytes
            places.append((off, n))
            off = (off + n + _ALIGN - 1) // _ALIGN * _ALIGN
        size = places[-1][0] + places[-1][1]
        path = os.path.join(shm_dir(), f"gpufleet-{self.owner}-{os.getpid()}-{next(_counter)}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            return None, None
        try:
            try:
                os.posix_fallocate(fd, 0, size)
                # MAP_POPULATE: the pages mapped in one call, not faulted in one by one by the copy
                with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as m:
                    for pb, (o, n) in zip(payload.buffers, places):
                        m[o:o + n] = pb.raw().cast("B")
            finally:
                os.close(fd)
        except OSError:
            os.unlink(path)
            return None, None
        return path, places

    def recv(self) -> tuple[Any, Optional[Received]]:
        """The next (header, payload); ``EOFError``/``OSError`` when the connection is gone,
        ``LoadError`` when a payload's file could not be mapped."""
        return self.open(self.reader.recv())

    @staticmethod
    def open(raw) -> tuple[Any, Optional[Received]]:
        """(header, payload) from a message as the pipe delivered it."""
        header, data, places, path = raw
        if data is None:
            return header, None
        if path is None:
            return header, Received(data, [])
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.unlink(path)
                size = places[-1][0] + places[-1][1]
                m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        except OSError as e:
            raise LoadError(f"a message's shared-memory file {path} could not be read: {e}", header) from e
        view = memoryview(m)
        return header, Received(data, [view[off:off + n] for off, n in places])


def discard(path: Optional[str]) -> None:
    """Removes a sent message's file if its receiver never took it (it died first)."""
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def cleanup(owner: int) -> None:
    """Removes the files of ``owner``'s messages that nobody received."""
    for path in glob.glob(os.path.join(shm_dir(), f"gpufleet-{owner}-*")):
        discard(path)
