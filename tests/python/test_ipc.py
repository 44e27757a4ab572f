"""The executor's message transport (Note [Out-of-band buffers] in python/gpufleet/_ipc.py) on a real
pipe, then through real GPUExecutor workers."""
from __future__ import annotations

import copy
import mmap
import multiprocessing as mp
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


def _through(obj, directory=None, monkeypatch=None):
    """Sends obj over a real pipe (a thread receives, so big in-band messages cannot block)."""
    if directory is not None:
        monkeypatch.setenv("GPUFLEET_IPC_DIR", str(directory))
    r, w = mp.Pipe(duplex=False)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("msg", r.recv()))
    t.start()
    _ipc.Channel(None, w, os.getpid()).send("hdr", _serialize.dumps(obj))
    t.join()
    raw = got["msg"]
    files = os.listdir(directory) if directory is not None and directory.exists() else None
    header, body = _ipc.Channel.open(raw)
    assert header == "hdr"
    return raw, body.load(), files


def test_large_buffers_go_through_a_file_that_the_receiver_removes(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    big = rng.standard_normal((int(rng.integers(300, 700)), 257)).astype(np.float32)
    fortran = np.asfortranarray(rng.integers(0, 255, size=(641, 523), dtype=np.uint8))
    strided = big[::2]  # not contiguous: in band
    small = rng.standard_normal(17)
    blob, data = bytearray(rng.bytes(_ipc.THRESHOLD + 3)), rng.bytes(_ipc.THRESHOLD)
    msg = {"task": ("x", [big, fortran]), "strided": strided, "small": small, "blob": blob, "bytes": data,
           "short": b"abc"}
    raw, out, files = _through(msg, tmp_path, monkeypatch)
    assert raw[3] is not None and len(raw[2]) == 2  # big, fortran (pickle keeps bytes in band)
    assert len(files) == 1 and files[0].startswith(f"gpufleet-{os.getpid()}-")
    assert os.listdir(tmp_path) == []  # unlinked by the receiver on load
    for a, b in [(out["task"][1][0], big), (out["task"][1][1], fortran), (out["strided"], strided),
                 (out["small"], small)]:
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert out["task"][1][1].flags.f_contiguous and out["task"][1][0].flags.c_contiguous
    assert out["blob"] == blob and type(out["blob"]) is bytearray and out["bytes"] == data
    assert type(out["bytes"]) is bytes and out["short"] == b"abc" and out["task"][0] == "x"
    got = out["task"][1][0]
    assert isinstance(_backing(got), mmap.mmap)
    assert got.flags.writeable
    got *= 2  # copy-on-write: the sender's array and the file are untouched
    np.testing.assert_array_equal(out["task"][1][0], big * 2)
    assert not np.shares_memory(got, big)


def test_small_messages_and_missing_shared_memory_go_in_band(tmp_path, monkeypatch):
    raw, out, _ = _through(("ok", 1, np.arange(10)), tmp_path, monkeypatch)
    assert raw[3] is None and out[0] == "ok"
    big = np.random.default_rng().standard_normal(_serialize.THRESHOLD)  # 8x the threshold in bytes
    raw, out, _ = _through(big, tmp_path / "missing", monkeypatch)
    assert raw[3] is None
    np.testing.assert_array_equal(out, big)


def test_executor_round_trips_big_arrays_and_leaves_no_file(sim_gpus, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_IPC_DIR", str(tmp_path))  # the workers inherit it
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
        before = arrays[3].copy()
        inplace = ex.submit(np.multiply, arrays[3], 3.0, out=arrays[3]).result()  # writes into the worker's copy
        np.testing.assert_array_equal(inplace, before * 3)
        np.testing.assert_array_equal(arrays[3], before)
        assert os.listdir(tmp_path) == []
        # a file left by a worker that died before reading it is removed at shutdown
        (tmp_path / f"gpufleet-{os.getpid()}-1-0").write_bytes(b"stale")
        (tmp_path / "gpufleet-1-1-0").write_bytes(b"someone else's")
    assert os.listdir(tmp_path) == ["gpufleet-1-1-0"]


def test_a_lost_file_is_a_load_error_not_a_broken_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_IPC_DIR", str(tmp_path))
    r, w = mp.Pipe(duplex=False)
    big = np.ones(_serialize.THRESHOLD, np.uint8)
    t = threading.Thread(target=lambda: _ipc.Channel(None, w, os.getpid()).send(("task", 7), _serialize.dumps(big)))
    t.start()
    t.join()
    for f in os.listdir(tmp_path):
        os.unlink(tmp_path / f)  # removed before the receiver maps it
    chan = _ipc.Channel(r, w, os.getpid())
    with pytest.raises(_ipc.LoadError, match="could not be read") as info:
        chan.recv()
    assert info.value.header == ("task", 7)  # the receiver still knows which call failed
    chan.send("next")  # the connection still works
    assert chan.recv() == ("next", None)
