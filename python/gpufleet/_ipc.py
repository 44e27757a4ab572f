"""Messages between a ``GPUExecutor`` and its workers, with large buffers in shared memory.

Note [Out-of-band buffers]: a message is pickled with protocol 5; every contiguous buffer of at least
``THRESHOLD`` bytes (NumPy arrays, ``pickle.PickleBuffer``; pickle keeps ``bytes`` in band) goes out
of band into one file under /dev/shm, and only the pickle (with the file's name and the buffers' places) goes through
the pipe: one copy into the file instead of pickling, pipe and unpickling copies. The receiver maps
the file copy-on-write, so the arrays it gets are writable and what it writes stays its own (as with
a pickled copy); it unlinks the name at once, and the arrays keep the mapping alive for as long as
they live. The space is reserved with ``posix_fallocate``, so a full /dev/shm (containers often have
64 MB) is an ``OSError`` at send time, never a SIGBUS later; the message then goes in band, as does
everything where /dev/shm is missing. Names start with ``gpufleet-<owner pid>-``, the executor's pid,
which removes what is left (a worker killed between send and receive) when it shuts down.
"""
from __future__ import annotations

import copyreg
import glob
import io
import itertools
import mmap
import os
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

THRESHOLD = 256 * 1024
_ALIGN = 64
_counter = itertools.count()


def shm_dir() -> str:
    return os.environ.get("GPUFLEET_IPC_DIR", "/dev/shm")


class OutOfBand:
    """What travels through the pipe in place of a message whose large buffers are in a file."""

    __slots__ = ("path", "places", "data")

    def __init__(self, path: str, places: list, data: bytes):
        self.path, self.places, self.data = path, places, data

    def __getstate__(self):
        return self.path, self.places, self.data

    def __setstate__(self, state):
        self.path, self.places, self.data = state

    def load(self) -> Any:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.unlink(self.path)
            size = self.places[-1][0] + self.places[-1][1]
            m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        view = memoryview(m)
        return pickle.loads(self.data, buffers=[view[off:off + n] for off, n in self.places])


def _dumps(obj: Any, buffer_callback=None) -> bytes:
    """Protocol 5 with the reducers ``multiprocessing`` adds (as ``Connection.send`` would use)."""
    f = io.BytesIO()
    p = pickle.Pickler(f, 5, buffer_callback=buffer_callback)
    table = copyreg.dispatch_table.copy()
    table.update(getattr(ForkingPickler, "_extra_reducers", {}))
    p.dispatch_table = table
    p.dump(obj)
    return f.getvalue()


def send(conn, obj: Any, owner: int) -> Optional[str]:
    """Sends ``obj`` over a ``multiprocessing`` connection; ``recv`` (or ``conn.recv`` followed by
    ``OutOfBand.load``) receives it. ``owner``: the pid that names and cleans up the files. Returns the
    path of the file holding the large buffers (the receiver removes it), or None."""
    big: list[pickle.PickleBuffer] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: pickled in band
            return True
        if raw.nbytes < THRESHOLD:
            return True
        big.append(pb)
        return False

    data = _dumps(obj, out_of_band)
    if not big:
        conn.send_bytes(data)
        return None
    places, off = [], 0
    for pb in big:
        n = pb.raw().nbytes
        places.append((off, n))
        off = (off + n + _ALIGN - 1) // _ALIGN * _ALIGN
    size = places[-1][0] + places[-1][1]
    path = os.path.join(shm_dir(), f"gpufleet-{owner}-{os.getpid()}-{next(_counter)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        conn.send_bytes(_dumps(obj))
        return None
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            # MAP_POPULATE: the pages mapped in one call, not faulted in one by one by the copy
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as m:
                for pb, (o, n) in zip(big, places):
                    m[o:o + n] = pb.raw().cast("B")
        finally:
            os.close(fd)
    except OSError:
        os.unlink(path)
        conn.send_bytes(_dumps(obj))
        return None
    try:
        conn.send(OutOfBand(path, places, data))
    except BaseException:
        os.unlink(path)
        raise
    return path


def discard(path: Optional[str]) -> None:
    """Removes a sent message's file if its receiver never took it (it died first)."""
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class LoadError(RuntimeError):
    """A message arrived but its shared-memory file could not be read (the connection is fine)."""


def recv(conn) -> Any:
    """The next message; ``EOFError``/``OSError`` when the connection is gone, ``LoadError`` when a
    message's file could not be mapped."""
    msg = conn.recv()
    if type(msg) is not OutOfBand:
        return msg
    try:
        return msg.load()
    except OSError as e:
        raise LoadError(f"a message's shared-memory file {msg.path} could not be read: {e}") from e


def cleanup(owner: int) -> None:
    """Removes the files of ``owner``'s messages that nobody received."""
    for path in glob.glob(os.path.join(shm_dir(), f"gpufleet-{owner}-*")):
        discard(path)
