"""Lifetimes and exports of CUDA memory (issue 17, items 4, 5, 8, 9, 10, 11 and 12): kernel results
whose stream is destroyed, used on other streams or exported from other threads, inputs freed while the
kernels read them, the tensor allocator under two streams (record_stream), a failing cudaFree, the
memory-pool fallback and release threshold, and KernelBuffer.__dlpack__'s dl_device and copy. GPU
tests: skipped without a CUDA device and a CUDA build; scripts/gpu_check.sh runs them (also under
compute-sanitizer, whose memcheck reports CUDA API errors such as a stream used after its destruction).

Where a test needs work to be still in flight, it queues a ~2 s spin kernel (PyTorch's
torch.cuda._sleep) on a stream first, so the race the code must handle is certain, not timing-dependent:
before the fixes each of these tests read or wrote memory at the wrong time and failed on its values."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import numpy as np
import pytest

import gpufleet
from gpufleet import _core
from gpufleet import kernels as K

from cuda_helpers import SEED, cp, requires_cuda, rng, torch  # noqa: F401 - fixtures

pytestmark = requires_cuda
SPIN_CYCLES = 4_000_000_000  # about 2 s at the 1.7-2 GHz of an H100/H200


def _spin(torch, stream_ptr: int) -> None:
    """Busies the stream `stream_ptr` (a cudaStream_t; 2 is the calling thread's per-thread default
    stream) for about 2 s."""
    with torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)):
        torch.cuda._sleep(SPIN_CYCLES)


def _blur_buffer(x, stream: int, owner=None):
    """A raw KernelBuffer: the blur of the CUDA array `x` queued on `stream` (an int, as C++ callers and
    unknown libraries pass it), optionally with the stream's owner."""
    return _core._kernels_gaussian_blur(x, stream, 31, 31, 5.0, 0.0, "replicate", stream_owner=owner)


def _settled_stats(cp):
    gc.collect()
    cp.cuda.Device().synchronize()
    return K.memory_stats()


# ---- item 4: results outlive their stream; other streams' uses -----------------------------------------------

def test_a_result_keeps_its_cupy_stream_until_it_is_released(cp, rng):
    # Before: results were freed with cudaFreeAsync on the stream that made them. CuPy destroys a
    # stream when its Stream object is collected, so releasing the result afterwards used a destroyed
    # stream (undefined; the error was swallowed and the block leaked). Now the result holds the stream
    # object: the stream lives until the result is released, and the release orders after all its work.
    x = rng.random((512, 512), dtype=np.float32)
    ref = K.gaussian_blur(x, 31, 5.0)
    d_x = cp.asarray(x)
    base = _settled_stats(cp)
    s = cp.cuda.Stream(non_blocking=True)
    try:
        alive = weakref.ref(s)
    except TypeError:  # a CuPy without weak references to streams: the counters below still check
        alive = None
    with s:
        y = K.gaussian_blur(d_x, 31, 5.0)
    del s
    gc.collect()
    if alive is not None:
        assert alive() is not None, "the result must keep the stream it was made on"
    cp.cuda.Device().synchronize()
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=1e-5, atol=1e-4)
    del y
    gc.collect()
    if alive is not None:
        assert alive() is None, "the stream goes with the last result made on it"
    after = _settled_stats(cp)
    assert after["failed_releases"] == 0
    assert after["live_results"] == base["live_results"]
    if after["backend"] == "pool":
        assert after["used_bytes"] == base["used_bytes"], "the result's memory went back to the pool"


def test_a_release_never_touches_a_destroyed_stream(cp, rng):
    # A C++-style call names its stream by handle only: no owner keeps it. The release must then wait
    # for the event recorded when the kernels were queued, never for the (destroyed) stream. Before: a
    # cudaFreeAsync on the destroyed handle, or on an unrelated stream that reused its address.
    d_x = cp.asarray(rng.random((1024, 1024), dtype=np.float32))
    base = _settled_stats(cp)
    for _ in range(20):
        s = cp.cuda.Stream(non_blocking=True)
        buf = _blur_buffer(d_x, s.ptr)
        s.synchronize()
        del s
        gc.collect()  # CuPy destroys the stream here
        others = [cp.cuda.Stream(non_blocking=True) for _ in range(3)]  # may take the freed handle
        del buf
        del others
    after = _settled_stats(cp)
    assert after["failed_releases"] == 0
    assert after["live_results"] == base["live_results"]
    if after["backend"] == "pool":
        assert after["used_bytes"] == base["used_bytes"]


def test_record_stream_protects_a_result_used_on_another_stream(cp, torch, rng):
    # A result read on another stream C: KernelBuffer.record_stream(C) makes its release wait for the
    # work queued on C by then (PyTorch's rule). Here C is busy for 2 s before it reads the result;
    # meanwhile the result is released and a new result of the same size is made and written on the
    # default stream. Before: no record_stream, and the released block was free for that new result at
    # once, which overwrote it before C read it.
    x = rng.random((1024, 1024), dtype=np.float32)
    ref = K.gaussian_blur(x, 31, 5.0)
    d_x, d_other = cp.asarray(x), cp.asarray(rng.random((1024, 1024), dtype=np.float32))
    buf = _blur_buffer(d_x, 1)
    c = cp.cuda.Stream(non_blocking=True)
    _spin(torch, c.ptr)
    with c:
        y = cp.from_dlpack(buf)  # C waits for the blur
        out = y * 1              # queued on C behind the spin
    buf.record_stream(c)
    del y, buf
    gc.collect()
    newer = [_blur_buffer(d_other, 1) for _ in range(4)]  # same size, default stream, written now
    cp.cuda.Device().synchronize()
    np.testing.assert_allclose(cp.asnumpy(out), ref, rtol=1e-5, atol=1e-4)
    del newer
    with pytest.raises(ValueError, match="per-thread default stream"):
        _blur_buffer(d_x, 1).record_stream(2)
    with pytest.raises(TypeError, match="expected a stream"):
        _blur_buffer(d_x, 1).record_stream("s")


# ---- item 5: exports from another thread -----------------------------------------------------------------------

def test_a_result_exported_from_another_thread_waits_for_its_kernels(cp, torch, rng):
    # The result is made on the per-thread default stream (2) of a worker thread, behind a 2 s spin, and
    # exported in the main thread to a non-blocking CuPy stream. Before: the export recorded its event on
    # "stream 2" in the main thread, i.e. the main thread's own idle per-thread stream, so the consumer
    # waited for nothing and read the result before the blur had run. Now it waits for the event
    # recorded by the producing thread.
    x = rng.random((1024, 1024), dtype=np.float32)
    ref = K.gaussian_blur(x, 31, 5.0)
    d_x = cp.asarray(x)
    cp.cuda.Device().synchronize()
    box = {}

    def produce():
        try:
            _spin(torch, 2)
            box["buf"] = _blur_buffer(d_x, 2)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            box["error"] = e

    worker = threading.Thread(target=produce)
    worker.start()
    worker.join()
    assert "error" not in box, box.get("error")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        y = cp.from_dlpack(box.pop("buf"))
        got = cp.asnumpy(y, stream=s)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


# ---- item 8: inputs stay alive while the kernels read them -------------------------------------------------------

def test_an_input_freed_right_after_the_call_is_not_reused_before_the_kernels_read_it(torch, rng):
    # The input is allocated on PyTorch's default stream; the kernels run on a side stream behind a 2 s
    # spin. The caller drops the input at once and PyTorch hands its block to the next allocation on the
    # default stream, which writes 7s into it now. Before: the binding released the input's capsule at
    # the end of the call, so the blur read those 7s. Now the capsule (and the tensor) is held until the
    # blur has run.
    x = rng.random((2048, 2048), dtype=np.float32)
    ref = K.gaussian_blur(x, 31, 5.0)
    d_x = torch.from_numpy(x).cuda()
    torch.cuda.synchronize()
    ptr = d_x.data_ptr()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN_CYCLES)
        y = K.gaussian_blur(d_x, 31, 5.0)
    del d_x
    z = torch.full((2048, 2048), 7.0, device="cuda")  # default stream: runs now
    reused = z.data_ptr() == ptr
    torch.cuda.synchronize()
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=1e-5, atol=1e-4)
    assert not reused, "the input's block was handed out while the kernels still had to read it"
    assert K.memory_stats()["held_inputs"] == 0, "held inputs are released once their kernels have run"


# ---- item 9: the tensor allocator with two streams ------------------------------------------------------------------

def test_tensor_allocator_two_stream_stress_with_record_stream(torch, rng):
    # Blocks allocated on stream A are read on stream B (behind a 2 s spin, so every read is still
    # pending), recorded with record_stream(B), freed, and immediately reallocated on A and overwritten.
    # Before: no record_stream; a freed block served the next allocation on A at once (its stream key),
    # and B then read the overwritten data. Now each block waits for B's event, the allocator's pending
    # list shows them, and every copy made on B holds its source's values.
    a, b = gpufleet.Stream(), gpufleet.Stream()
    _spin(torch, b.cuda_stream)
    sources, copies, scribbles = [], [], []
    for i in range(40):
        src = rng.random(int(rng.integers(1, 1 << 20)), dtype=np.float32)
        with gpufleet.stream(a):
            t = gpufleet.tensor(src, device="cuda")
        with gpufleet.stream(b):
            copies.append(t.clone())  # queued on B behind the spin
        t.record_stream(b)
        del t
        with gpufleet.stream(a):
            u = gpufleet.empty(src.shape, device="cuda")
            u.fill_(7.0)  # on A, now
        scribbles.append(u)
        sources.append(src)
    assert gpufleet.memory_stats("cuda:0")["pending_blocks"] > 0, "freed blocks wait for stream B"
    gpufleet.synchronize()
    for i, (src, c) in enumerate(zip(sources, copies)):
        np.testing.assert_array_equal(c.cpu().numpy(), src, err_msg=f"copy {i}")
    for u in scribbles:
        assert (u.cpu().numpy() == 7.0).all()
    del copies, scribbles
    gpufleet.empty_cache()
    stats = gpufleet.memory_stats("cuda:0")
    assert stats["pending_blocks"] == 0 and stats["cached_blocks"] == 0
    with pytest.raises(ValueError, match="CUDA tensor"):
        gpufleet.zeros(3).record_stream(a)


# ---- item 10: a failing cudaFree -------------------------------------------------------------------------------------

def test_a_failing_cudafree_never_hands_out_freed_memory(rng):
    # Four cached blocks; emptying the cache frees the first and fails on the second (injected, as a
    # cudaFree on a broken context would). Before: the loop stopped there and left every pointer on the
    # free lists, the freed one included, so the next allocation of its size got freed memory. Now every
    # block leaves the cache first; the failure is raised and counted.
    gpufleet.empty_cache()
    sizes = [(1 << 20) + 512 * i for i in range(4)]  # bytes; four blocks of the same rounded size (2 MiB)
    tensors = [gpufleet.empty(n // 4, device="cuda") for n in sizes]
    del tensors
    before = gpufleet.memory_stats("cuda:0")
    assert before["cached_blocks"] == 4
    _core._inject_cuda_free_failures(1, after=1)
    with pytest.raises(gpufleet.CudaError, match="injected"):
        gpufleet.empty_cache()
    stats = gpufleet.memory_stats("cuda:0")
    assert stats["cached_blocks"] == 0 and stats["cached_bytes"] == 0
    assert stats["num_raw_free_failures"] == before["num_raw_free_failures"] + 1
    hits = stats["num_cache_hits"]
    again = []  # kept alive: each allocation must come from cudaMalloc, none from the (emptied) cache
    for n in sizes:
        v = rng.random(n // 4, dtype=np.float32)
        again.append(gpufleet.tensor(v, device="cuda"))
        np.testing.assert_array_equal(again[-1].cpu().numpy(), v)
    assert gpufleet.memory_stats("cuda:0")["num_cache_hits"] == hits, "a block came from the emptied cache"


# ---- item 11: the memory pool, its release threshold, the fallback ------------------------------------------------

def test_the_kernel_pool_keeps_memory_across_synchronisations(cp, rng):
    # Before: cudaMallocAsync from the device's default pool, whose release threshold of 0 gives all
    # freed memory back to the driver at every synchronisation. Now gpufleet's pool keeps it (threshold
    # UINT64_MAX) until gpufleet.empty_cache() trims it.
    stats = _settled_stats(cp)
    if stats["backend"] == "caching":
        pytest.skip("this device has no CUDA memory pools: the caching backend is checked below")
    y = K.gaussian_blur(cp.asarray(rng.random((4096, 4096), dtype=np.float32)), 5, 1.0)
    del y
    stats = _settled_stats(cp)
    assert stats["backend"] == "pool"
    assert stats["release_threshold"] == 2**64 - 1
    assert stats["reserved_bytes"] >= 64 << 20, stats
    gpufleet.empty_cache()
    assert K.memory_stats()["reserved_bytes"] < stats["reserved_bytes"]


_CACHING_SCRIPT = textwrap.dedent("""
    import gc, json, numpy as np, cupy as cp
    from gpufleet import kernels as K
    rng = np.random.default_rng(%d)
    depth = np.clip(rng.normal(120, 40, (3, 97, 211)), 0, 255).astype(np.uint8)
    x = rng.random((3, 97, 211), dtype=np.float32)
    d_depth, d_x = cp.asarray(depth), cp.asarray(x)

    def checks():  # the results die with this frame
        ok = {}
        ok["blur"] = np.allclose(cp.asnumpy(K.gaussian_blur(d_x, 71, 7)), K.gaussian_blur(x, 71, 7), rtol=1e-5,
                                 atol=1e-4)
        ok["canny"] = bool((cp.asnumpy(K.canny(d_depth, 20, 50)) == K.canny(depth, 20, 50)).all())
        g, c = K.kmeans1d(d_depth, 4), K.kmeans1d(depth, 4)
        ok["kmeans"] = bool((cp.asnumpy(g.labels) == c.labels).all() and (cp.asnumpy(g.centres) == c.centres).all())
        ok["minmax"] = bool((cp.asnumpy(K.normalize_minmax(d_x)) == K.normalize_minmax(x)).all())
        ok["mean"] = np.allclose(cp.asnumpy(K.mean(d_x, axis=(1, 2))), K.mean(x, axis=(1, 2)), rtol=1e-12)
        ok["score"] = np.allclose(cp.asnumpy(K.congestion_score(d_depth, mode="faithful")),
                                  K.congestion_score(depth, mode="faithful"), rtol=1e-6)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            y = K.gaussian_blur(d_x, 5, 1.0)
        del s
        gc.collect()  # the stream is kept by y
        cp.cuda.Device().synchronize()
        ok["after stream"] = bool((cp.asnumpy(y) == cp.asnumpy(K.gaussian_blur(d_x, 5, 1.0))).all())
        return {name: bool(v) for name, v in ok.items()}  # NumPy booleans are not JSON

    ok = checks()
    gc.collect()
    cp.cuda.Device().synchronize()
    print(json.dumps({"ok": ok, "stats": K.memory_stats()}))
""")


def test_the_caching_fallback_runs_every_kernel():
    # Devices and drivers without memory pools (cudaDevAttrMemoryPoolsSupported = 0) fall back to the
    # tensors' caching allocator; GPUFLEET_KERNELS_MEMORY=caching forces it here. Before: cudaMallocAsync
    # was required, with no fallback. The choice itself is tested without a GPU (KernelsMemory.*).
    pytest.importorskip("cupy")
    env = dict(os.environ, GPUFLEET_KERNELS_MEMORY="caching")
    run = subprocess.run([sys.executable, "-c", _CACHING_SCRIPT % SEED], env=env, capture_output=True, text=True,
                         timeout=100)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["stats"]["backend"] == "caching"
    assert all(report["ok"].values()), report["ok"]
    assert report["stats"]["failed_releases"] == 0
    assert report["stats"]["live_results"] == 0
    bad = subprocess.run([sys.executable, "-c", "import cupy as cp; from gpufleet import kernels as K; "
                          "K.mean(cp.ones((2, 2)))"], env=dict(os.environ, GPUFLEET_KERNELS_MEMORY="fast"),
                         capture_output=True, text=True, timeout=100)
    assert bad.returncode != 0 and "GPUFLEET_KERNELS_MEMORY='fast' is invalid" in bad.stderr


# ---- item 12: KernelBuffer.__dlpack__ follows the array API's dl_device and copy ---------------------------------

def test_kernel_buffer_dlpack_dl_device_and_copy(cp, rng):
    # Before: dl_device was ignored (a CUDA capsule came back when the consumer asked for the CPU) and
    # copy=True raised. The array API standard: dl_device names where the consumer wants the data (a
    # copy where it is not; BufferError where impossible or copy=False); copy=True always copies.
    x = rng.random((40, 50), dtype=np.float32)
    ref = K.gaussian_blur(x, 31, 5.0)
    buf = _blur_buffer(cp.asarray(x), 1)
    host = gpufleet.from_dlpack(buf.__dlpack__(dl_device=(1, 0), max_version=(1, 0)))
    assert host.device == gpufleet.Device("cpu")
    np.testing.assert_allclose(host.numpy(), ref, rtol=1e-5, atol=1e-4)
    same = gpufleet.from_dlpack(buf)
    copied = gpufleet.from_dlpack(buf.__dlpack__(copy=True, stream=1))
    assert copied.device == same.device == gpufleet.Device("cuda:0")
    assert copied.data_ptr() != same.data_ptr()
    np.testing.assert_array_equal(copied.cpu().numpy(), same.cpu().numpy())
    own = buf.__dlpack__(dl_device=(2, 0))  # its own device: no copy
    assert gpufleet.from_dlpack(own).data_ptr() == same.data_ptr()
    with pytest.raises(BufferError, match="copy=False"):
        buf.__dlpack__(dl_device=(1, 0), copy=False)
    with pytest.raises(BufferError, match="DLPack device"):
        buf.__dlpack__(dl_device=(2, gpufleet.device_count()))
    with pytest.raises(ValueError, match="stream=0"):
        buf.__dlpack__(stream=0)
    with pytest.raises(ValueError, match="stream must be None"):
        buf.__dlpack__(dl_device=(1, 0), stream=1)
