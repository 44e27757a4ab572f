"""DLPack exchange: NumPy 2 round trips with versioned and unversioned capsules, calls with no
arguments, copy and dl_device rules, ownership when the producer dies first, refcounts (no leak over
10^5 round trips), interpreter shutdown, and PyTorch/CuPy/JAX when they are installed."""
from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpufleet

CUDA_BUILD = gpufleet.build_info()["cuda"]
HAS_GPU = CUDA_BUILD and gpufleet.topology().source not in ("none", "simulated")

_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]


def capsule_name(capsule) -> str:
    return _get_name(capsule).decode()


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"seed={seed}")
    return np.random.default_rng(seed)


class Legacy:
    """A producer from before DLPack 1.0 (NumPy 1.2x): __dlpack__ takes only `stream`."""

    def __init__(self, obj):
        self.obj = obj

    def __dlpack__(self, stream=None):
        return self.obj.__dlpack__()

    def __dlpack_device__(self):
        return self.obj.__dlpack_device__()


def test_capsule_kinds_and_device():
    t = gpufleet.zeros(3, 4)
    assert t.__dlpack_device__() == (1, 0)
    assert capsule_name(t.__dlpack__()) == "dltensor"  # no arguments: NumPy 1.24 style
    assert capsule_name(t.__dlpack__(max_version=(1, 0))) == "dltensor_versioned"
    assert capsule_name(t.__dlpack__(max_version=(1, 3))) == "dltensor_versioned"
    assert capsule_name(t.__dlpack__(max_version=(0, 8))) == "dltensor"
    assert capsule_name(t.__dlpack__(stream=None, max_version=None, dl_device=(1, 0), copy=None)) == "dltensor"
    with pytest.raises(TypeError):
        t.__dlpack__(None)  # keyword-only, as the standard says


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                                   "float64"])
def test_numpy_round_trip_shares_memory(rng, dtype):
    shape = tuple(int(x) for x in rng.choice([1, 2, 3, 5, 7, 13], size=int(rng.integers(0, 4))))
    a = (rng.standard_normal(shape) * 40).astype(dtype) if shape else np.array(3, dtype=dtype)
    t = gpufleet.from_dlpack(a)
    assert t.dtype is gpufleet.as_dtype(dtype) and t.shape == a.shape
    assert t.data_ptr() == a.ctypes.data or a.size == 0
    b = np.from_dlpack(t)  # NumPy 2 consumer (versioned capsule)
    assert np.shares_memory(a, b) or a.size == 0
    assert np.array_equal(b, a)
    if a.size:
        t.fill_(1)  # written through gpufleet, read through both NumPy arrays
        assert np.all(a == 1) and np.all(b == 1)


def test_strided_and_legacy_exchange(rng):
    a = rng.standard_normal((9, 10)).astype(np.float32)
    view = a[1::2, ::3]
    t = gpufleet.from_dlpack(view)
    assert t.strides == (20, 3) and np.array_equal(t.numpy(), view)
    b = np.from_dlpack(t)
    assert b.strides == view.strides and np.shares_memory(a, b)
    # a producer that only knows the unversioned protocol, consumed by gpufleet and by NumPy
    u = gpufleet.from_dlpack(Legacy(view))
    assert np.array_equal(u.numpy(), view) and u.data_ptr() == t.data_ptr()
    c = np.from_dlpack(Legacy(t))
    assert np.shares_memory(c, a)
    # raw capsules, consumed once
    cap = t.__dlpack__()
    w = gpufleet.from_dlpack(cap)
    assert capsule_name(cap) == "used_dltensor" and w.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="already consumed"):
        gpufleet.from_dlpack(cap)
    vcap = t.__dlpack__(max_version=(1, 0))
    gpufleet.from_dlpack(vcap)
    assert capsule_name(vcap) == "used_dltensor_versioned"


def test_copy_and_device_rules(rng):
    a = rng.standard_normal(7)
    t = gpufleet.from_numpy(a)
    c = np.from_dlpack(t, copy=True)
    assert not np.shares_memory(c, a) and np.array_equal(c, a)
    assert np.shares_memory(np.from_dlpack(t, copy=False), a)
    assert not np.shares_memory(gpufleet.from_dlpack(a, copy=True).numpy(), a)
    ro = a.copy()
    ro.flags.writeable = False
    r = gpufleet.from_dlpack(ro)  # read-only producer: gpufleet tensors are writable, so it copies
    assert np.array_equal(r.numpy(), ro) and not np.shares_memory(r.numpy(), ro)
    with pytest.raises(BufferError, match="read-only"):
        gpufleet.from_dlpack(ro, copy=False)
    with pytest.raises(BufferError, match=r"\(2, 0\)"):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(ValueError, match="stream must be None"):
        t.__dlpack__(stream=1)
    with pytest.raises(TypeError, match="__dlpack__"):
        gpufleet.from_dlpack([1, 2])
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="built without CUDA|no CUDA device"):
            gpufleet.from_dlpack(a, device="cuda:0")


def test_producer_dies_first(rng):
    a = rng.standard_normal((5, 3))
    expected = a.copy()
    t = gpufleet.from_dlpack(a)
    del a
    gc.collect()
    assert np.array_equal(t.numpy(), expected)
    src = gpufleet.tensor(expected)
    b = np.from_dlpack(src)
    del src
    gc.collect()
    assert np.array_equal(b, expected)
    view = gpufleet.from_dlpack(b).narrow(0, 1, 3)
    del b
    gc.collect()
    assert np.array_equal(view.numpy(), expected[1:4])


def test_refcounts_return_to_baseline(rng):
    a = rng.standard_normal(11)
    base = sys.getrefcount(a)
    t = gpufleet.from_numpy(a)
    caps = [t.__dlpack__(), t.__dlpack__(max_version=(1, 0))]  # never consumed
    views = [np.from_dlpack(t), gpufleet.from_dlpack(t), t.numpy()]
    assert sys.getrefcount(a) == base + 1  # only the storage holds the array
    del t, caps, views
    gc.collect()
    assert sys.getrefcount(a) == base


def test_no_leak_over_1e5_round_trips(rng):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    a = rng.standard_normal((4, 3)).astype(np.float32)

    def cycle(n):
        for _ in range(n):
            t = gpufleet.from_numpy(a)
            b = np.from_dlpack(t)
            u = gpufleet.from_dlpack(b)
            u.numpy()
            t.__dlpack__()

    cycle(20_000)  # warm up allocator pools
    gc.collect()
    before = proc.memory_info().rss
    cycle(100_000)
    gc.collect()
    grown = proc.memory_info().rss - before
    # Each round trip allocates several hundred bytes; a leak of even one small object per trip
    # would grow RSS by well over 10 MB.
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1e5 round trips"
    assert sys.getrefcount(a) == 2


def test_interpreter_shutdown_with_live_exchanges(tmp_path):
    script = textwrap.dedent("""
        import numpy as np, gpufleet
        a = np.arange(12.0)
        t = gpufleet.from_numpy(a)                 # storage holds a Python object
        b = np.from_dlpack(t)                      # NumPy holds our capsule's tensor
        u = gpufleet.from_dlpack(np.ones(3))       # we hold NumPy's deleter
        cap = t.__dlpack__(max_version=(1, 0))     # an unconsumed capsule
        class Cycle: pass
        c = Cycle(); c.self = c; c.t = t; c.u = u  # freed by the last GC at shutdown
        gpufleet.KEEP = [t, u, cap]                # freed during module teardown
        print("ok")
    """)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok" and out.stderr == ""


def test_torch_exchange(rng):
    torch = pytest.importorskip("torch")
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:]
    t = gpufleet.from_dlpack(x)
    assert t.shape == (3, 3) and t.strides == tuple(x.stride())
    t.fill_(5)
    assert bool((x == 5).all())
    y = torch.from_dlpack(gpufleet.tensor([1.0, 2.0]))
    assert y.tolist() == [1.0, 2.0]
    bf = gpufleet.from_dlpack(torch.ones(3, dtype=torch.bfloat16))
    assert bf.dtype is gpufleet.bfloat16 and bf.to("float32").tolist() == [1.0, 1.0, 1.0]


def test_jax_exchange():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    t = gpufleet.from_dlpack(x, copy=None)
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and a CUDA build")
def test_cuda_exchange_with_torch_and_cupy_streams():
    torch = pytest.importorskip("torch")
    x = torch.arange(10, device="cuda:0", dtype=torch.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = gpufleet.from_dlpack(x)
    assert t.device == gpufleet.Device("cuda:0") and t.cpu().tolist() == list(range(10))
    g = gpufleet.tensor([1.0, 2.0, 3.0], device="cuda:0")
    assert g.__dlpack_device__() == (2, 0)
    y = torch.from_dlpack(g)
    assert y.device.type == "cuda" and y.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="stream=0"):
        g.__dlpack__(stream=0)
    cap = g.__dlpack__(stream=-1)
    assert capsule_name(cap) == "dltensor"
    host = gpufleet.from_dlpack(g.__dlpack__(dl_device=(1, 0), max_version=(1, 0)))  # copied to the host
    assert host.device == gpufleet.Device("cpu") and host.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(BufferError, match="copy=False"):
        g.__dlpack__(dl_device=(1, 0), copy=False)
    cupy = pytest.importorskip("cupy")
    c = cupy.arange(5, dtype=cupy.float64)
    with cupy.cuda.Stream():
        u = gpufleet.from_dlpack(c)
    assert u.cpu().tolist() == [0, 1, 2, 3, 4]
    assert cupy.from_dlpack(g).get().tolist() == [1.0, 2.0, 3.0]
