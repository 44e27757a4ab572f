"""gpufleet.Tensor: creation, zero-copy NumPy sharing, .to() identity vs copy, dtype conversions
against NumPy, errors, scatter/gather chunking, Module and state-dict prefixes, current device."""
from __future__ import annotations

import collections
import gc
import sys
import threading
import types

import numpy as np
import pytest

import gpufleet

CUDA_BUILD = gpufleet.build_info()["cuda"]
HAS_GPU = CUDA_BUILD and gpufleet.topology().source not in ("none", "simulated")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and a CUDA build")
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the no-device error path")

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def awkward_shape(rng, ndim=None):
    ndim = int(rng.integers(1, 4)) if ndim is None else ndim
    return tuple(int(x) for x in rng.choice([1, 2, 3, 5, 7, 11, 13], size=ndim))


def random_array(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return (rng.standard_normal(shape) * 50).astype(dtype)


# ---- creation and facts ----------------------------------------------------------------------------


def test_dtypes_and_facts(rng):
    assert gpufleet.float32.itemsize == 4 and gpufleet.bfloat16.itemsize == 2
    assert gpufleet.bfloat16.is_floating_point and not gpufleet.int64.is_floating_point
    assert gpufleet.as_dtype(np.float16) is gpufleet.float16
    assert gpufleet.as_dtype(np.dtype("int8")) is gpufleet.int8
    assert gpufleet.as_dtype("torch.bfloat16") is gpufleet.bfloat16
    assert gpufleet.as_dtype("double") is gpufleet.float64
    assert repr(gpufleet.float16) == "gpufleet.float16"
    with pytest.raises(TypeError, match="complex64.*bfloat16"):
        gpufleet.as_dtype("complex64")
    with pytest.raises(TypeError, match="uint16"):
        gpufleet.as_dtype(np.uint16)
    shape = awkward_shape(rng, 3)
    t = gpufleet.empty(*shape, dtype="float16")
    assert t.shape == shape and t.dtype is gpufleet.float16 and t.ndim == 3
    assert t.strides == (shape[1] * shape[2], shape[2], 1)
    assert t.nbytes == 2 * int(np.prod(shape)) and t.is_contiguous() and not t.is_pinned()
    assert t.device == gpufleet.Device("cpu") and not t.is_cuda and t.memory_kind == "pageable"
    assert gpufleet.zeros(shape).numpy().sum() == 0
    assert np.all(gpufleet.ones(3, 2, dtype=gpufleet.int32).numpy() == 1)
    assert gpufleet.full((2,), True).dtype is gpufleet.bool
    assert gpufleet.full((2,), 7).dtype is gpufleet.int64
    assert gpufleet.full((2,), 0.5).dtype is gpufleet.float32
    assert gpufleet.full((2, 3), 2**53 + 1, dtype="int64").numpy()[1, 2] == 2**53 + 1
    like = gpufleet.empty_like(t.transpose(0, 2))
    assert like.shape == shape[::-1] and like.is_contiguous() and like.dtype is gpufleet.float16
    assert gpufleet.zeros_like(t, dtype="float64").numpy().dtype == np.float64
    assert gpufleet.zeros(0, 3).numel() == 0


def test_tensor_from_python_data_infers_pytorch_defaults(rng):
    assert gpufleet.tensor([1.5, 2]).dtype is gpufleet.float32
    assert gpufleet.tensor([1, 2]).dtype is gpufleet.int64
    assert gpufleet.tensor([True, False]).dtype is gpufleet.bool
    assert gpufleet.tensor(3.25).shape == () and gpufleet.tensor(3.25).item() == 3.25
    a = random_array(rng, awkward_shape(rng), np.float64)
    t = gpufleet.tensor(a)
    assert t.dtype is gpufleet.float64 and np.array_equal(t.numpy(), a)
    assert not np.shares_memory(t.numpy(), a)  # tensor() copies
    a_ro = a.copy()
    a_ro.flags.writeable = False
    assert np.array_equal(gpufleet.tensor(a_ro).numpy(), a_ro)
    u = gpufleet.tensor(t, dtype="float32")
    assert u.dtype is gpufleet.float32 and np.array_equal(u.numpy(), a.astype(np.float32))
    b = gpufleet.tensor([[0.1, 0.2]], dtype=gpufleet.bfloat16)
    assert b.dtype is gpufleet.bfloat16
    assert np.allclose(b.to(gpufleet.float32).numpy(), [[0.1, 0.2]], rtol=1e-2)
    with pytest.raises(TypeError, match="complex"):
        gpufleet.tensor([1j])
    with pytest.raises((TypeError, ValueError)):
        gpufleet.tensor([[1, 2], [3]])
    with pytest.raises(TypeError, match="uint32"):
        gpufleet.tensor(np.zeros(3, np.uint32))


def test_from_numpy_shares_memory_and_keeps_the_array_alive(rng):
    shape = awkward_shape(rng, 2)
    a = random_array(rng, shape, np.float32)
    refs = sys.getrefcount(a)
    t = gpufleet.from_numpy(a)
    assert sys.getrefcount(a) == refs + 1
    assert t.data_ptr() == a.ctypes.data
    a[0, 0] = 1234.5  # written through NumPy, read through the tensor
    assert t.numpy()[0, 0] == 1234.5
    t.narrow(1, shape[1] - 1, 1).fill_(-7.0)  # written through the tensor, read through NumPy
    assert np.all(a[:, -1] == -7.0)
    expected = a.copy()
    del a
    gc.collect()
    assert np.array_equal(t.numpy(), expected)
    # strided arrays are views too
    b = random_array(rng, (9, 8), np.int16)
    v = gpufleet.from_numpy(b[1::2, ::3])
    assert v.strides == (16, 3) and not v.is_contiguous()
    v.fill_(5)
    assert np.all(b[1::2, ::3] == 5) and np.sum(b == 5) >= 12
    n = v.numpy()
    assert np.shares_memory(n, b) and np.array_equal(n, b[1::2, ::3])
    del t, v, n
    gc.collect()
    assert sys.getrefcount(b) == 2


def test_from_numpy_rejects_what_it_cannot_share():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        gpufleet.from_numpy([1, 2, 3])
    with pytest.raises(TypeError, match="complex"):
        gpufleet.from_numpy(np.zeros(3, np.complex64))
    with pytest.raises(TypeError, match="native byte order"):
        gpufleet.from_numpy(np.zeros(3, ">f4"))
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        gpufleet.from_numpy(ro)
    with pytest.raises(ValueError, match="negative strides"):
        gpufleet.from_numpy(np.zeros(4)[::-1])


@pytest.mark.parametrize("name", NUMPY_DTYPES)
def test_numpy_and_asarray_share_memory(rng, name):
    a = random_array(rng, awkward_shape(rng), name)
    t = gpufleet.tensor(a)
    n = t.numpy()
    assert n.dtype == np.dtype(name) and np.array_equal(n, a)
    assert np.shares_memory(n, np.asarray(t))
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    if name != "float64":
        with pytest.raises(ValueError, match="copy=False"):
            np.asarray(t, dtype=np.float64, copy=False)
    assert not np.shares_memory(np.array(t, copy=True), n)


def test_bfloat16_numpy_is_a_clear_type_error():
    t = gpufleet.zeros(3, dtype="bfloat16")
    with pytest.raises(TypeError, match="bfloat16.*float32"):
        t.numpy()
    with pytest.raises(TypeError, match="bfloat16"):
        np.asarray(t)
    assert "tensor([0., 0., 0.], dtype=gpufleet.bfloat16)" == repr(t)


# ---- conversions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", NUMPY_DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_dtype_conversions_match_numpy_astype(rng, src):
    shape = awkward_shape(rng, 2)
    a = random_array(rng, (shape[0] * 2, shape[1] + 3), src)
    view = a[::2, 1:-2].T  # strided source
    for dst in NUMPY_DTYPES:
        src_vals = view
        if np.dtype(src).kind == "f" and np.dtype(dst).kind in "iu":
            info = np.iinfo(dst)  # NumPy leaves out-of-range float->int undefined: stay in range
            src_vals = np.clip(view, max(info.min, -1e9), min(info.max, 1e9)).astype(src)
        got = gpufleet.from_numpy(src_vals).to(dst).numpy()
        want = src_vals.astype(dst)
        assert got.dtype == want.dtype
        if np.dtype(dst).kind == "f":
            assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}")), (src, dst)
        else:
            assert np.array_equal(got, want), (src, dst)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float64_to_float16_rounds_like_numpy_bit_for_bit(rng):
    # every binade of float16 (subnormals, ties, overflow to inf), NaN and infinities
    x = np.ldexp(rng.uniform(1, 2, 20000), rng.integers(-28, 18, 20000)) * rng.choice([-1, 1], 20000)
    x = np.concatenate([x, [np.nan, np.inf, -np.inf, 65520.0, 65519.99, 2.0**-25, 3 * 2.0**-25, -0.0]])
    x = x[:, None][::1, 0]  # keep a plain float64 vector
    for dt in (np.float64, np.float32):
        got = gpufleet.tensor(x.astype(dt)).to("float16").numpy()
        want = x.astype(dt).astype(np.float16)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    back = gpufleet.tensor(x.astype(np.float16)).to("float64").numpy()
    assert np.array_equal(back, x.astype(np.float16).astype(np.float64), equal_nan=True)


def test_bfloat16_rounds_to_nearest_even(rng):
    x = (rng.standard_normal(4099) * np.exp(rng.uniform(-20, 20, 4099))).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    want = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    t = gpufleet.from_numpy(x).to(gpufleet.bfloat16)
    assert t.dtype is gpufleet.bfloat16 and t.nbytes == 2 * x.size
    assert np.array_equal(t.to("float32").numpy(), want)
    assert np.array_equal(t.to("float64").numpy(), want.astype(np.float64))
    ints = gpufleet.tensor([3, -8, 255]).to("bfloat16").to("int32").numpy()
    assert ints.tolist() == [3, -8, 255]


# ---- .to() identity vs copy ------------------------------------------------------------------------


def test_to_returns_self_when_nothing_changes(rng):
    t = gpufleet.tensor(random_array(rng, awkward_shape(rng), np.float32))
    torch_like_cpu = types.SimpleNamespace(type="cpu", index=None)
    for same in (t.to("cpu"), t.to(gpufleet.float32), t.to("cpu", "float32"), t.to(t), t.to(np.float32),
                 t.to(device="cpu", dtype=np.dtype("float32")), t.to(gpufleet.Device("cpu")), t.to(torch_like_cpu),
                 t.to(), t.cpu(), t.contiguous(), t.to("cpu", non_blocking=True)):
        assert same is t
    for other in (t.to(copy=True), t.to("cpu", copy=True), t.to("cpu", "float32", False, True), t.clone()):
        assert other is not t and not np.shares_memory(other.numpy(), t.numpy())
        assert np.array_equal(other.numpy(), t.numpy())
    f64 = t.to("float64")
    assert f64.dtype is gpufleet.float64 and np.array_equal(f64.numpy(), t.numpy().astype(np.float64))
    nc = t.reshape(-1)[::2] if t.numel() > 1 else t.reshape(-1)
    assert (nc.contiguous() is nc) == nc.is_contiguous()
    with pytest.raises(TypeError, match="dtype given twice"):
        t.to("float32", "float64")
    with pytest.raises(ValueError, match="gpu"):
        t.to("gpu")


@no_gpu
def test_cuda_paths_raise_cleanly_without_a_device(sim_gpus):
    t = gpufleet.ones(3)
    expected = "built without CUDA" if not CUDA_BUILD else "no CUDA device is available"
    for call in (lambda: t.to("cuda"), lambda: t.cuda(), lambda: t.to("cuda:1", non_blocking=True),
                 lambda: t.pin_memory(), lambda: gpufleet.empty(2, device="cuda:0"),
                 lambda: gpufleet.Stream(), lambda: gpufleet.synchronize(), lambda: gpufleet.ones(2, pin_memory=True)):
        with pytest.raises(RuntimeError, match=expected):
            call()
    sim_gpus(2)  # simulated GPUs make selection work, but no CUDA memory appears
    with pytest.raises(RuntimeError, match=expected):
        t.to("cuda:1")
    assert gpufleet.memory_stats("cuda:0")["allocated_bytes"] == 0
    assert set(gpufleet.memory_stats("cpu")) >= {"allocated_bytes", "reserved_bytes", "num_cache_hits"}
    gpufleet.empty_cache()
    gpufleet.synchronize("cpu")  # nothing queued on the host


def test_errors_name_the_bad_value():
    t = gpufleet.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        t.copy_(gpufleet.zeros(3, 2))
    with pytest.raises(ValueError, match="non-negative"):
        gpufleet.empty(2, -1)
    with pytest.raises(TypeError, match="shape"):
        gpufleet.empty("3")
    with pytest.raises(IndexError, match="dimension 2 is out of range"):
        t.transpose(0, 2)
    with pytest.raises(IndexError, match="out of bounds"):
        t[5]
    with pytest.raises(ValueError, match="view needs a contiguous"):
        t.transpose(0, 1).view(6)
    with pytest.raises(TypeError, match="expected a number"):
        t.fill_("x")
    with pytest.raises(ValueError, match="pin_memory=True only applies to CPU"):
        gpufleet.empty(2, device="cuda:0", pin_memory=True)
    with pytest.raises(ValueError, match="tensor 1 has dtype float64 but tensor 0 has dtype float32"):
        gpufleet.cat([t, t.to("float64")])
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(2, 2\)"):
        gpufleet.cat([t, gpufleet.zeros(2, 2)])


def test_indexing_and_views_match_numpy(rng):
    a = random_array(rng, (7, 5, 3), np.int32)
    t = gpufleet.from_numpy(a)
    for key in (1, -1, (2, 3), slice(1, 6, 2), (slice(None), 4), (slice(None, None, 3), slice(1, None), 0)):
        assert np.array_equal(t[key].numpy(), a[key]), key
    assert np.array_equal(t.permute(2, 0, 1).numpy(), a.transpose(2, 0, 1))
    assert np.array_equal(t.transpose(0, 2).reshape(15, 7).numpy(), a.transpose(2, 1, 0).reshape(15, 7))
    assert np.array_equal(t.view(-1).numpy(), a.reshape(-1)) and t.view(-1)._shares_storage_with(t)
    assert [row.numpy().tolist() for row in t[0]] == a[0].tolist()  # iteration
    assert len(t) == 7 and t.size() == (7, 5, 3) and t.size(-1) == 3 and t.stride(0) == 15
    assert t.tolist() == a.tolist()
    assert "dtype=gpufleet.int32" in repr(t)


# ---- multi-device helpers (CPU device) -------------------------------------------------------------


def dataparallel_sizes(n, k):
    c = -(-n // k)
    return [min(c, n - i) for i in range(0, n, c)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_scatter_gather_follow_dataparallel_chunking(rng, k):
    n = int(rng.integers(1, 40))
    a = random_array(rng, (n, 3, 2), np.float32)
    t = gpufleet.from_numpy(a)
    assert gpufleet.chunk_sizes(n, k) == dataparallel_sizes(n, k)
    parts = gpufleet.scatter(t, ["cpu"] * k)
    assert [p.shape[0] for p in parts] == dataparallel_sizes(n, k)
    assert all(p._shares_storage_with(t) for p in parts)  # same device: views, as torch's chunk
    assert np.array_equal(gpufleet.gather(parts, "cpu").numpy(), a)
    cols = gpufleet.scatter(t, ["cpu", "cpu"], dim=1, chunk_sizes=[1, 2])
    assert [c.shape for c in cols] == [(n, 1, 2), (n, 2, 2)]
    assert np.array_equal(gpufleet.gather(cols, "cpu", dim=-2).numpy(), a)
    copies = gpufleet.broadcast(t, ["cpu"] * k)
    assert len(copies) == k and not any(c._shares_storage_with(t) for c in copies)
    assert gpufleet.chunk_sizes(5, 4) == [2, 2, 1]


def test_scatter_errors():
    t = gpufleet.zeros(5, 2)
    with pytest.raises(ValueError, match=r"chunk sizes \[2, 2\] sum to 4 but dimension 0 has size 5"):
        gpufleet.scatter(t, ["cpu", "cpu"], chunk_sizes=[2, 2])
    with pytest.raises(ValueError, match="2 chunk sizes given for 3 devices"):
        gpufleet.scatter(t, ["cpu"] * 3, chunk_sizes=[2, 3])
    with pytest.raises(ValueError, match="at least one device"):
        gpufleet.scatter(t, [])
    with pytest.raises(ValueError, match="gpu"):
        gpufleet.scatter(t, ["gpu"])


# ---- Module and state dicts ------------------------------------------------------------------------


class FooNet(gpufleet.Module):
    def __init__(self, n=3, layers=3):
        super().__init__()
        self.linears = gpufleet.Module()
        for i in range(layers):
            lin = gpufleet.Module()
            lin.weight = gpufleet.tensor(np.random.default_rng(i).standard_normal((n, n)), dtype="float32")
            lin.add_module("act", None)
            self.linears.add_module(str(i), lin)
        self.steps = gpufleet.zeros(1, dtype="int64")


def test_module_to_moves_in_place_and_returns_itself():
    net = FooNet()
    w0 = net.linears._modules["0"].weight
    assert net.to("cpu") is net and net.linears._modules["0"].weight is w0  # nothing to change
    assert net.to(gpufleet.float64) is net
    assert net.linears._modules["0"].weight.dtype is gpufleet.float64  # replaced in place
    assert net.steps.dtype is gpufleet.int64  # integer tensors keep their dtype (PyTorch's rule)
    assert list(net.state_dict()) == ["steps", "linears.0.weight", "linears.1.weight", "linears.2.weight"]
    with pytest.raises(TypeError, match="floating point"):
        net.to(gpufleet.int32)
    with pytest.raises(TypeError, match="cannot assign int"):
        net.steps = 3


def test_load_state_dict_explains_the_dataparallel_prefix():
    src, dst = FooNet(), FooNet(layers=3)
    for t in dst.tensors():
        t.fill_(0)
    sd = gpufleet.add_prefix(src.state_dict(), "module.")
    assert isinstance(sd, collections.OrderedDict) and next(iter(sd)) == "module.steps"
    with pytest.raises(gpufleet.StateDictError) as e:
        dst.load_state_dict(sd)
    msg = str(e.value)
    assert 'Missing key(s) in state_dict: "steps", "linears.0.weight"' in msg
    assert 'Unexpected key(s) in state_dict: "module.steps", "module.linears.0.weight"' in msg
    assert "strip_prefix" in msg
    assert dst.linears._modules["1"].weight.numpy().sum() == 0  # nothing copied on error
    res = dst.load_state_dict(gpufleet.strip_prefix(sd))
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert np.array_equal(dst.linears._modules["1"].weight.numpy(), src.linears._modules["1"].weight.numpy())
    # NumPy values and a shape mismatch
    sd2 = {k: v.numpy() * 2 for k, v in src.state_dict().items()}
    dst.load_state_dict(sd2)
    assert np.array_equal(dst.linears._modules["2"].weight.numpy(), sd2["linears.2.weight"])
    sd2["linears.2.weight"] = np.zeros((4, 3), np.float32)
    with pytest.raises(gpufleet.StateDictError, match=r"size mismatch for linears.2.weight.*\(4, 3\).*\(3, 3\)"):
        dst.load_state_dict(sd2)
    partial = {"steps": np.array([5])}
    res = dst.load_state_dict(partial, strict=False)
    assert res.missing_keys == ["linears.0.weight", "linears.1.weight", "linears.2.weight"]
    assert dst.steps.item() == 5


def test_strip_and_add_prefix_work_on_any_mapping():
    sd = collections.OrderedDict([("module.a.weight", 1), ("module.b", 2), ("c", 3)])
    sd._metadata = collections.OrderedDict([("module", {"version": 1}), ("module.a", {"version": 2})])
    out = gpufleet.strip_prefix(sd)
    assert list(out.items()) == [("a.weight", 1), ("b", 2), ("c", 3)]
    assert type(out) is collections.OrderedDict and out._metadata == {"": {"version": 1}, "a": {"version": 2}}
    assert list(gpufleet.add_prefix({"x": 1}, "model.")) == ["model.x"]
    assert gpufleet.strip_prefix(types.MappingProxyType({"module.x": 1})) == {"x": 1}
    with pytest.raises(ValueError, match="'module.x' and 'x' both become 'x'"):
        gpufleet.strip_prefix({"module.x": 1, "x": 2})
    with pytest.raises(TypeError, match="mapping"):
        gpufleet.strip_prefix([("module.x", 1)])


# ---- current device -------------------------------------------------------------------------------


def test_current_device_is_thread_local(sim_gpus):
    assert gpufleet.current_device() == gpufleet.Device("cuda:0")
    if gpufleet.device_count() == 0:
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            gpufleet.set_device(1)
    sim_gpus(4)
    try:
        gpufleet.set_device("cuda:2")
        assert gpufleet.current_device() == gpufleet.Device("cuda:2")
        seen = []
        th = threading.Thread(target=lambda: seen.append(gpufleet.current_device()))
        th.start()
        th.join()
        assert seen == [gpufleet.Device("cuda:0")]
        with gpufleet.device(3) as d:
            assert d == gpufleet.Device("cuda:3") and gpufleet.current_device() == d
        assert gpufleet.current_device() == gpufleet.Device("cuda:2")
        with pytest.raises(ValueError, match="4 GPUs are visible"):
            gpufleet.set_device(4)
        with pytest.raises(ValueError, match="CUDA device with an index"):
            gpufleet.set_device("cpu")
        if not HAS_GPU:
            with pytest.raises(RuntimeError, match="cuda:2"):
                gpufleet.ones(1).to("cuda")  # 'cuda' means the current device
    finally:
        gpufleet._core._set_device_index(0)


# ---- GPU machine ----------------------------------------------------------------------------------------


@needs_gpu
def test_gpu_round_trips_and_conversions(rng):
    for name in NUMPY_DTYPES:
        a = random_array(rng, awkward_shape(rng, 3), name)
        t = gpufleet.tensor(a)
        g = t.to("cuda:0")
        assert g.device == gpufleet.Device("cuda:0") and g.is_cuda and g.memory_kind == "device"
        assert g.to("cuda:0") is g and g.cuda() is g
        with pytest.raises(TypeError, match=r"Use Tensor.cpu\(\)"):
            g.numpy()
        assert np.array_equal(g.cpu().numpy(), a)
        assert np.array_equal(g.permute(2, 0, 1).cpu().numpy(), a.transpose(2, 0, 1))
        for dst in ("float64", "int32", "float16"):
            src = np.clip(a, -1000, 1000) if a.dtype.kind == "f" else a
            want = src.astype(dst)
            assert np.array_equal(gpufleet.tensor(src).cuda().to(dst).cpu().numpy(), want, equal_nan=True)
            assert np.array_equal(gpufleet.tensor(src).to("cuda", dst).cpu().numpy(), want, equal_nan=True)
    z = gpufleet.zeros(5, 7, device="cuda")
    assert z.cpu().numpy().sum() == 0
    with pytest.raises(ValueError, match="Expected all tensors to be on the same device, but found at least two "
                                         "devices, cuda:0 and cpu!"):
        gpufleet.cat([z, gpufleet.zeros(5, 7)])


@needs_gpu
def test_gpu_pinned_non_blocking_and_streams(rng):
    a = random_array(rng, (1 << 20,), np.float32)
    p = gpufleet.from_numpy(a).pin_memory()
    assert p.is_pinned() and p.pin_memory() is p and p.__dlpack_device__() == (3, 0)
    s = gpufleet.Stream()
    with gpufleet.stream(s):
        assert gpufleet.current_stream() == s
        g = p.to("cuda", non_blocking=True)
        back = g.to("cpu", non_blocking=True)
        assert back.is_pinned()
        assert np.array_equal(back.numpy(), a)  # numpy() waits for the copy
    assert gpufleet.current_stream().cuda_stream == 0
    e0, e1 = gpufleet.Event(enable_timing=True), gpufleet.Event(enable_timing=True)
    e0.record()
    p.to("cuda")
    e1.record()
    e1.synchronize()
    assert e0.elapsed_time(e1) >= 0
    gpufleet.synchronize()


@needs_gpu
def test_gpu_allocator_reuses_blocks_under_churn():
    gpufleet.empty_cache()
    before = gpufleet.memory_stats("cuda:0")
    for i in range(200):
        t = gpufleet.empty(1000 + i, device="cuda:0")
        del t
    s = gpufleet.memory_stats("cuda:0")
    assert s["num_cache_hits"] - before["num_cache_hits"] >= 190
    assert s["allocated_bytes"] == before["allocated_bytes"]
    gpufleet.empty_cache()
    assert gpufleet.memory_stats("cuda:0")["cached_bytes"] == 0


@needs_gpu
def test_gpu_two_devices_peer_copy(rng):
    if gpufleet.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    a = random_array(rng, (33, 17), np.float32)
    g0 = gpufleet.tensor(a, device="cuda:0")
    g1 = g0.to("cuda:1")
    assert g1.device == gpufleet.Device("cuda:1") and np.array_equal(g1.cpu().numpy(), a)
    parts = gpufleet.scatter(g0, ["cuda:0", "cuda:1"])
    assert [p.device.index for p in parts] == [0, 1]
    assert np.array_equal(gpufleet.gather(parts, "cuda:1").cpu().numpy(), a)
    with pytest.raises(ValueError, match="cuda:0 and cuda:1"):
        gpufleet.cat(parts)
