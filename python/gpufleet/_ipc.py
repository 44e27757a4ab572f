"""Messages between a ``GPUExecutor`` (or a process pipeline) and its workers: small frames on a Unix
socket, large data in reusable shared memory.

Note [Shared-memory arenas]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
A message is a header plus an optional ``Payload`` (Note [Callables by value] in _serialize.py):
its pickle and the buffers pickle protocol 5 took out of band (NumPy arrays of 256 KiB and more).
Each end of a worker's socket owns an *arena* for the direction it sends in: segments of shared
memory made with ``memfd_create`` (no name in /dev/shm, so nothing can be left behind: the kernel
frees a segment when the last descriptor and mapping of it go, also after SIGKILL of either side),
sized with ``posix_fallocate`` (a full memory cgroup is an ``OSError`` here, never a SIGBUS later),
and mapped with ``MAP_POPULATE`` on both sides, once, when the segment is made and its descriptor
passed over the socket (``SCM_RIGHTS``); the descriptors are closed at once, the mappings stay.
Segments are reused, so the page-table work happens once per segment, not once per message.

Sending copies the buffers (and a pickle of more than ``INLINE_MAX`` bytes) into a free region of
the arena, the only copy on the way: the receiver's arrays are views of the region (writable; the
sender never touches a region the receiver holds). A region is *lent*: when the last array viewing
it is freed (a ``weakref.finalize`` on the NumPy array that bases them all), the receiver queues a
release, which rides on the next frame it sends the other way (the worker's releases of argument
regions on its results, the parent's of result regions on the next calls), and the sender reuses the
region. Arrays a user keeps (results held in a list, an argument stored in a worker's global) keep
their region, and the arena grows on demand; fully free segments beyond ``KEEP_FREE`` are dropped
(both sides unmap them). Without memfd (or when a segment cannot be made) buffers travel in band.

Frames stay small (``INLINE_MAX``), so a bounded number of calls in flight never fills the socket;
the parent's engine still sends without blocking (``pending_out``/``flush``), so a busy worker can
never stall the others.
"""
from __future__ import annotations

import array
import collections
import ctypes
import errno
import mmap
import os
import pickle
import socket
import struct
import weakref
from typing import Any, Optional

from ._serialize import THRESHOLD, Payload, loads  # noqa: F401 - THRESHOLD re-exported for tests

INLINE_MAX = 16 * 1024  # a pickle larger than this goes into the arena too
KEEP_FREE = 2  # fully free segments kept for reuse per arena
_PAGE = mmap.PAGESIZE
_SEG_MIN = 8 << 20
_HDR = struct.Struct("<IIQ")  # envelope length, descriptors attached, in-band buffer bytes
_MAX_FDS = 64
_ANC = socket.CMSG_SPACE(_MAX_FDS * 4)


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Unmap:
    """Owns a mapping: unmaps it when the last buffer (and array) viewing it is gone."""

    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size

    def __del__(self):
        _libc.munmap(self.addr, self.size)


def _mapping(fd: int, size: int):
    """``size`` bytes of ``fd`` mapped shared and populated, as a writable ctypes buffer. Unlike
    ``mmap.mmap`` it keeps no duplicate of the descriptor: a segment costs no descriptor once mapped."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a {size}-byte shared-memory segment failed: {os.strerror(err)}")
    buf = (ctypes.c_char * size).from_address(addr)
    buf._unmap = _Unmap(addr, size)
    return buf


class _Segment:
    __slots__ = ("id", "size", "mm", "free", "used")

    def __init__(self, seg_id: int, size: int, buf):
        self.id, self.size, self.mm = seg_id, size, memoryview(buf).cast("B")
        self.free = [(0, size)]  # sorted, coalesced (offset, length)
        self.used: dict[int, int] = {}  # offset -> length

    def alloc(self, n: int) -> Optional[int]:
        for i, (off, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (off + n, length - n)
                self.used[off] = n
                return off
        return None

    def release(self, off: int) -> None:
        n = self.used.pop(off)
        free = self.free
        free.append((off, n))
        free.sort()
        merged = [free[0]]
        for o, length in free[1:]:
            po, pl = merged[-1]
            if po + pl == o:
                merged[-1] = (po, pl + length)
            else:
                merged.append((o, length))
        self.free[:] = merged


class _Arena:
    """The segments one side writes into (see the Note)."""

    def __init__(self):
        self.segments: dict[int, _Segment] = {}
        self._next = 0
        self.broken = not hasattr(os, "memfd_create")

    def alloc(self, n: int, new: list) -> Optional[tuple[_Segment, int]]:
        """A region of ``n`` bytes; a segment made for it is appended to ``new`` as (segment, fd)."""
        n = _round(max(n, 1), _PAGE)
        for seg in self.segments.values():
            off = seg.alloc(n)
            if off is not None:
                return seg, off
        if self.broken:
            return None
        size = max(_round(2 * n, 2 << 20), _SEG_MIN)
        try:
            fd = os.memfd_create(f"gpufleet-{os.getpid()}", os.MFD_CLOEXEC)
        except OSError:
            self.broken = True
            return None
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mm = _mapping(fd, size)
        except OSError:
            os.close(fd)
            return None
        seg = _Segment(self._next, size, mm)
        self._next += 1
        self.segments[seg.id] = seg
        new.append((seg, fd))
        off = seg.alloc(n)
        return seg, off

    def release(self, seg_id: int, off: int, dropped: list) -> None:
        seg = self.segments.get(seg_id)
        if seg is None:
            return
        seg.release(off)
        if not seg.used:
            idle = [s for s in self.segments.values() if not s.used]
            for s in idle[:-KEEP_FREE] if len(idle) > KEEP_FREE else ():
                del self.segments[s.id]
                s.mm.release()
                dropped.append(s.id)

    def close(self) -> None:
        for s in self.segments.values():
            try:
                s.mm.release()
            except BufferError:  # pragma: no cover - a slice is alive; the mapping goes with it
                pass
        self.segments.clear()


class Received:
    """A payload as it arrived: ``load()`` unpickles it (in the receiver, so a payload that fails
    to unpickle is that message's failure, never the connection's)."""

    __slots__ = ("data", "buffers")

    def __init__(self, data, buffers: list):
        self.data, self.buffers = data, buffers

    def load(self) -> Any:
        try:
            return loads(self.data, self.buffers)
        finally:
            self.data = self.buffers = None  # the pickle's region (if in the arena) can go


class Channel:
    """One end of a worker's socket (see the Note). ``send``/``recv`` block; the parent's engine
    uses ``pack`` + ``pending_out``/``flush`` and ``read_available`` on a non-blocking socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.arena = _Arena()
        self._peer: dict[int, mmap.mmap] = {}  # the other side's segments, mapped here
        self._released: collections.deque = collections.deque()  # regions of the peer's arena we are done with
        self._dropped: list[int] = []  # our segments dropped since the last frame (the peer unmaps them)
        self._rbuf = bytearray()
        self._rpos = 0
        self._fds: collections.deque = collections.deque()
        self._out: collections.deque = collections.deque()  # (memoryview, fds) not yet written
        self._peeked = None
        self.closed = False

    # ---- sending ----------------------------------------------------------------------------
    def pack(self, header: Any, payload: Optional[Payload] = None) -> tuple[bytes, list]:
        """One frame: its bytes and the descriptors to attach (new segments)."""
        releases = []
        while self._released:
            releases.append(self._released.popleft())
        new: list = []
        data = inline = None
        places = None
        if payload is not None:
            data = payload.data
            sizes = [pb.raw().nbytes for pb in payload.buffers]
            big_data = len(data) > INLINE_MAX
            if sizes or big_data:
                offs, total = [], 0
                for n in ([len(data)] if big_data else []) + sizes:
                    offs.append(total)
                    total = _round(total + n, 64)
                got = self.arena.alloc(total, new)
                if got is None:  # no shared memory: in band
                    inline = [pb.raw().cast("B") for pb in payload.buffers]
                    places = ("inline", sizes)
                else:
                    seg, base = got
                    mm = seg.mm
                    parts = ([memoryview(data)] if big_data else []) + [pb.raw().cast("B") for pb in payload.buffers]
                    for o, part in zip(offs, parts):
                        mm[base + o:base + o + part.nbytes] = part
                    places = ("shm", seg.id, base, total, [(base + o, n) for o, n in
                                                           zip(offs, ([len(data)] if big_data else []) + sizes)],
                              big_data)
                    if big_data:
                        data = None
        dropped, self._dropped = self._dropped, []
        env = pickle.dumps((header, data, places, releases, [(s.id, s.size) for s, _ in new], dropped), 5)
        extra = sum(p.nbytes for p in inline) if inline else 0
        frame = _HDR.pack(len(env), len(new), extra) + env
        if inline:
            frame = b"".join([frame] + [bytes(p) for p in inline])
        fds = [fd for _, fd in new]
        return frame, fds

    def send(self, header: Any, payload: Optional[Payload] = None) -> None:
        """Sends one frame, blocking until it is written."""
        frame, fds = self.pack(header, payload)
        try:
            self._write_blocking(frame, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _write_blocking(self, frame: bytes, fds: list) -> None:
        view = memoryview(frame)
        if fds:
            n = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            view = view[n:]
        if len(view):
            self.sock.sendall(view)

    def queue(self, frame: bytes, fds: list) -> None:
        """Adds a packed frame to the output the engine flushes (descriptors are closed once sent)."""
        self._out.append([memoryview(frame), fds])

    @property
    def pending_out(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Writes what the non-blocking socket takes; True when everything is out."""
        out = self._out
        while out:
            view, fds = out[0]
            try:
                if fds:
                    n = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    for fd in fds:
                        os.close(fd)
                    out[0][1] = []
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return False
            if n < len(view):
                out[0][0] = view[n:]
                return False
            out.popleft()
        return True

    # ---- receiving --------------------------------------------------------------------------
    def _fill(self, block: bool) -> bool:
        """Reads what is there (waits for something when ``block``); False when nothing came."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(1 << 18, _ANC, 0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise OSError(errno.EMSGSIZE, "descriptors lost in transit (MSG_CTRUNC)")
        if not data:
            raise EOFError("the other side closed the connection")
        if self._rpos and self._rpos == len(self._rbuf):
            self._rbuf, self._rpos = bytearray(), 0
        self._rbuf += data
        return True

    def _next_frame(self):
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos < _HDR.size:
            return None
        env_len, nfds, extra = _HDR.unpack_from(buf, pos)
        end = pos + _HDR.size + env_len + extra
        if len(buf) < end or len(self._fds) < nfds:
            return None
        env = pickle.loads(memoryview(buf)[pos + _HDR.size:pos + _HDR.size + env_len])
        inline = bytes(buf[pos + _HDR.size + env_len:end]) if extra else b""
        self._rpos = end
        if end == len(buf):
            self._rbuf, self._rpos = bytearray(), 0
        fds = [self._fds.popleft() for _ in range(nfds)]
        return self._open(env, inline, fds)

    def _open(self, env, inline: bytes, fds: list):
        header, data, places, releases, new, dropped = env
        for (seg_id, size), fd in zip(new, fds):
            try:
                self._peer[seg_id] = _mapping(fd, size)
            finally:
                os.close(fd)
        for seg_id in dropped:
            self._peer.pop(seg_id, None)  # unmapped when no array views it (none does: it was free)
        for seg_id, off in releases:
            self.arena.release(seg_id, off, self._dropped)
        if places is None:
            return header, (None if data is None else Received(data, []))
        if places[0] == "inline":
            buffers, o = [], 0
            for n in places[1]:
                buffers.append(bytearray(inline[o:o + n]))
                o += n
            return header, Received(data, buffers)
        _, seg_id, base, total, parts, big_data = places
        mm = self._peer[seg_id]
        import numpy as np

        region = np.frombuffer(mm, dtype=np.uint8, count=total, offset=base)
        # released when the last view (an argument, a result array, the pickle until loaded) is freed
        weakref.finalize(region, self._released.append, (seg_id, base))
        views = [region[o - base:o - base + n] for o, n in parts]
        del region
        if big_data:
            data = views.pop(0)
        return header, Received(data, views)

    def recv(self) -> tuple[Any, Optional[Received]]:
        """The next (header, payload), waiting for it; ``EOFError``/``OSError`` when the
        connection is gone."""
        if self._peeked is not None:
            got, self._peeked = self._peeked, None
            return got
        while True:
            got = self._next_frame()
            if got is not None:
                return got
            self._fill(block=True)

    def read_available(self) -> tuple[list, bool]:
        """Every complete frame that can be read without waiting (non-blocking socket), and whether
        the other side has closed the connection."""
        eof = False
        try:
            while self._fill(block=False):
                pass
        except EOFError:
            eof = True
        out = []
        while True:
            got = self._next_frame()
            if got is None:
                return out, eof
            out.append(got)

    def peek(self):
        """The next frame if it has already arrived (no waiting), else None; ``recv`` returns it."""
        if self._peeked is None:
            self._peeked = self._next_frame()
        return self._peeked

    def send_frames(self, frames: list) -> None:
        """Writes packed frames, as few writes as their descriptors allow (blocking socket)."""
        plain: list = []
        try:
            for frame, fds in frames:
                if fds:
                    if plain:
                        self.sock.sendall(b"".join(plain))
                        plain = []
                    self._write_blocking(frame, fds)
                else:
                    plain.append(frame)
            if plain:
                self.sock.sendall(plain[0] if len(plain) == 1 else b"".join(plain))
        finally:
            for _, fds in frames:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        """Closes the socket and this side's arena (views the user holds keep their mappings)."""
        if self.closed:
            return
        self.closed = True
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        while self._fds:
            os.close(self._fds.popleft())
        self.arena.close()
        self._peer.clear()
        try:
            self.sock.close()
        except OSError:
            pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(parent end, worker end); the worker end is passed to the worker by descriptor."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a, b
