"""The executor's transport (Note [Shared-memory arenas] in python/gpufleet/_ipc.py) on a real socket
pair, then through real GPUExecutor workers."""
from __future__ import annotations

import copy
import gc
import os
import threading

import numpy as np
import pytest

import gpufleet
from gpufleet import _ipc, _serialize


def _backing(a):
    """The object at the end of an array's base chain (through memoryviews)."""
    seen = a
    while True:
        nxt = getattr(seen, "base", None)
        if nxt is None and isinstance(seen, memoryview):
            nxt = seen.obj
        if nxt is None or nxt is seen:
            return seen
        seen = nxt


class Pair:
    """Two channels on a socket pair; ``echo`` runs a thread that sends back what it receives."""

    def __init__(self):
        a, b = _ipc.socketpair()
        self.a, self.b = _ipc.Channel(a), _ipc.Channel(b)
        self.thread = None

    def echo(self):
        def run():
            while True:
                header, payload = self.b.recv()
                if header is None:
                    return
                obj = payload.load() if payload is not None else None
                payload = None
                self.b.send(("back", header), _serialize.dumps(obj))
                obj = None

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def round_trip(self, obj, tag=0):
        self.a.send(tag, _serialize.dumps(obj))
        header, payload = self.a.recv()
        assert header == ("back", tag)
        return payload.load()

    def close(self):
        if self.thread is not None:
            self.a.send(None)
            self.thread.join()
        self.a.close()
        self.b.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_large_buffers_travel_in_shared_memory_and_arrive_as_writable_views():
    before = set(os.listdir("/dev/shm"))
    rng = np.random.default_rng()
    big = rng.standard_normal((int(rng.integers(300, 700)), 257)).astype(np.float32)
    fortran = np.asfortranarray(rng.integers(0, 255, size=(641, 523), dtype=np.uint8))
    strided = big[::2]  # not contiguous: in band
    small = rng.standard_normal(17)
    blob, data = bytearray(rng.bytes(_serialize.THRESHOLD + 3)), rng.bytes(_serialize.THRESHOLD)
    msg = {"task": ("x", [big, fortran]), "strided": strided, "small": small, "blob": blob, "bytes": data,
           "short": b"abc", "text": ["s" * 40] * 2000}  # the pickle alone is over INLINE_MAX: it goes too
    p = Pair()
    p.echo()
    out = p.round_trip(msg)
    for a, b in [(out["task"][1][0], big), (out["task"][1][1], fortran), (out["strided"], strided),
                 (out["small"], small)]:
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert out["task"][1][1].flags.f_contiguous and out["task"][1][0].flags.c_contiguous
    assert out["blob"] == blob and type(out["blob"]) is bytearray and out["bytes"] == data
    assert out["short"] == b"abc" and out["text"] == msg["text"]
    got = out["task"][1][0]
    assert hasattr(_backing(got), "_unmap")  # a view of the arena (a mapping it owns): no copy on the way in
    assert got.flags.writeable
    got *= 2  # the region is ours until we free it
    np.testing.assert_array_equal(out["task"][1][0], big * 2)
    assert not np.shares_memory(got, big)
    assert set(os.listdir("/dev/shm")) - before == set()  # memfd: nothing with a name
    p.close()


def test_regions_are_reused_when_freed_and_the_arena_grows_while_they_are_held():
    p = Pair()
    p.echo()
    x = np.random.default_rng().standard_normal(1_000_000)  # 8 MB
    for i in range(6):
        np.testing.assert_array_equal(p.round_trip(x, i), x)
        gc.collect()
    # one segment each way, reused: each round trip released its regions
    assert len(p.a.arena.segments) == 1 and len(p.b.arena.segments) == 1
    held = [p.round_trip(x, 10 + i) for i in range(5)]  # results kept: their regions stay lent
    assert sum(s.size for s in p.b.arena.segments.values()) >= 5 * x.nbytes
    for h in held:
        np.testing.assert_array_equal(h, x)
    del held, h
    gc.collect()
    p.round_trip(np.zeros(3), 99)  # carries the releases; the fully free segments beyond KEEP_FREE go
    p.round_trip(np.zeros(3), 100)
    idle = [s for s in p.b.arena.segments.values() if not s.used]
    assert len(idle) <= _ipc.KEEP_FREE
    p.close()


def test_descriptors_are_closed_once_mapped_and_views_outlive_the_channel():
    p = Pair()
    p.echo()
    before = _fds()
    x = np.arange(3_000_000, dtype=np.int64)
    kept = [p.round_trip(x, i) for i in range(3)]
    p.round_trip(0, 99)  # the echo thread has closed what it sent with the last one
    assert _fds() == before  # segments came over SCM_RIGHTS, were mapped, and their fds closed
    p.close()
    for k in kept:  # the sender and its arena are gone; the mapping lives with the arrays
        np.testing.assert_array_equal(k, x)


def test_without_shared_memory_buffers_go_in_band():
    p = Pair()
    p.echo()
    p.a.arena.broken = p.b.arena.broken = True
    x = np.random.default_rng().standard_normal(_serialize.THRESHOLD)  # 8x the threshold in bytes
    back = p.round_trip({"x": x, "y": [x[::3]]})
    np.testing.assert_array_equal(back["x"], x)
    assert not hasattr(_backing(back["x"]), "_unmap") and back["x"].flags.writeable
    assert p.a.arena.segments == {} and p.b.arena.segments == {}
    p.close()


def test_a_payload_that_fails_to_unpickle_leaves_the_connection_working():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
    import exec_funcs as F

    p = Pair()
    p.a.send(("call", 7), _serialize.dumps([np.ones(100_000), F.Unrebuildable("on purpose")]))
    header, payload = p.b.recv()
    assert header == ("call", 7)
    with pytest.raises(ValueError, match="refusing to rebuild: on purpose"):
        payload.load()
    p.a.send("next")
    assert p.b.recv() == ("next", None)
    p.close()


def test_executor_round_trips_nested_arrays_and_leaves_nothing(sim_gpus):
    before = set(os.listdir("/dev/shm"))
    sim_gpus(2)
    rng = np.random.default_rng()
    arrays = [rng.standard_normal((int(rng.integers(200, 400)), 331)) for _ in range(5)]
    nested = {"a": arrays[0], "list": [arrays[1], (arrays[2], "tag")], "bytes": bytearray(b"x" * 300_000)}
    with gpufleet.GPUExecutor(slots_per_device=2) as ex:
        back = ex.submit(copy.deepcopy, nested).result()
        assert back["bytes"] == nested["bytes"] and back["list"][1][1] == "tag"
        np.testing.assert_array_equal(back["list"][1][0], arrays[2])
        doubled = list(ex.map(np.multiply, arrays, [2.0] * 5))  # the worker writes into its own copy
        for d, a in zip(doubled, arrays):
            np.testing.assert_array_equal(d, a * 2)
        before3 = arrays[3].copy()
        inplace = ex.submit(np.multiply, arrays[3], 3.0, out=arrays[3]).result()  # writes into the worker's copy
        np.testing.assert_array_equal(inplace, before3 * 3)
        np.testing.assert_array_equal(arrays[3], before3)
    assert set(os.listdir("/dev/shm")) - before == set()
