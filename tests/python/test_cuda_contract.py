"""The CUDA kernels keep the CPU path's contract (issue 17, items 1, 2, 3, 6 and 7): NaN raises as on the
CPU, ±inf groups, batches past the old grid caps, bit-exact k-means on near ties, and no host wait for
the taps and weights. GPU tests: skipped without a CUDA device and a CUDA build; scripts/gpu_check.sh
runs them. Each test says what it checks and how the code before issue 17 failed it."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from gpufleet import kernels as K

from cuda_helpers import SEED, cp, requires_cuda, rng  # noqa: F401 - fixtures

pytestmark = requires_cuda


def _gpu(cp, a):
    return cp.asarray(np.ascontiguousarray(a))


# ---- item 1: NaN raises ValueError, as on the CPU ------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("out", [np.uint8, np.float32])
def test_normalize_minmax_nan_raises_like_the_cpu(cp, rng, dtype, out):
    # Before: fminf/fmaxf skipped NaN and the call returned (float32 NaN, uint8 0) instead of raising.
    x = rng.random((3, 50, 70)).astype(dtype)
    x[2, 0, 0] = np.nan
    x[1, 20, 33] = np.nan  # the first one: flat index 1*3500 + 20*70 + 33
    with pytest.raises(ValueError) as cpu_error:
        K.normalize_minmax(x, dtype=out)
    with pytest.raises(ValueError) as gpu_error:
        K.normalize_minmax(_gpu(cp, x), dtype=out)
    assert "flat index 4933 " in str(cpu_error.value)
    assert str(gpu_error.value).replace("cuda:0", "cpu") == str(cpu_error.value)
    # One NaN in a 2-D float64 array far into a large group (several blocks per group).
    y = rng.random((1500, 1700))
    y[1499, 1698] = np.nan
    with pytest.raises(ValueError, match=f"flat index {1499 * 1700 + 1698} "):
        K.normalize_minmax(_gpu(cp, y))


def test_normalize_minmax_without_nan_is_unchanged_and_integers_never_wait(cp, rng):
    x = (rng.random((4, 33, 41)) * 1000 - 300).astype(np.int32)
    np.testing.assert_array_equal(cp.asnumpy(K.normalize_minmax(_gpu(cp, x))), K.normalize_minmax(x))
    f = rng.random((4, 33, 41)).astype(np.float32)
    np.testing.assert_array_equal(cp.asnumpy(K.normalize_minmax(_gpu(cp, f), dtype=np.float32)),
                                  K.normalize_minmax(f, dtype=np.float32))


# ---- item 2: ±infinity start values ----------------------------------------------------------------------

def _infinite_groups(rng, dtype):
    x = rng.random((6, 40, 50)).astype(np.float64) * 100
    x[0] = np.inf
    x[1] = -np.inf
    x[2] = 1e39   # "no data" fill beyond float32's range: +inf after the cast, as in the seed
    x[3] = -1e39
    x[4, ::3] = np.inf  # both infinities and finite values: NaN, as NumPy computes the seed's formula
    x[4, 1::3] = -np.inf
    x[5, 7, 9] = 1e39   # finite values and one +inf: 0 for the finite ones, NaN for the infinite one
    if dtype == np.float32:
        with np.errstate(over="ignore"):  # 1e39 -> inf is the point
            return x.astype(np.float32)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_minmax_infinite_groups_match_the_cpu(cp, rng, dtype):
    # Before: min/max started at ±FLT_MAX, so a group of +inf had min FLT_MAX and max inf (NaN out where
    # the CPU gives 0), a group of -inf max -FLT_MAX, and float64 1e39 fills went the same way.
    x = _infinite_groups(rng, dtype)
    cpu = K.normalize_minmax(x, dtype=np.float32)
    gpu = cp.asnumpy(K.normalize_minmax(_gpu(cp, x), dtype=np.float32))
    np.testing.assert_array_equal(gpu, cpu)  # NaN where the CPU has NaN
    assert (cpu[:4] == 0).all() and np.isnan(cpu[4]).all() and np.isnan(cpu[5, 7, 9])
    # uint8 output: the constant (infinite) groups map to 0; NaN has no defined uint8, not compared.
    np.testing.assert_array_equal(cp.asnumpy(K.normalize_minmax(_gpu(cp, x[:4]))), np.zeros((4, 40, 50), np.uint8))


# ---- item 3: no batch caps ---------------------------------------------------------------------------------

def _depth(rng, shape):
    """Smooth depth with blobs (as the congestion tests' synthetic depth), uint8."""
    n, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 120 * yy / max(1, h - 1) + 40 * np.sin(xx / max(1, w) * 6)
    out = np.empty(shape, np.uint8)
    for i in range(n):
        d = base.copy()
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        d[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 3 + 3) ** 2] -= 50
        out[i] = np.clip(d + rng.normal(0, 4, (h, w)), 0, 255).astype(np.uint8)
    return out


def test_blur_and_faithful_score_past_262140_rows(cp, rng):
    # Before: gaussian_blur refused n*h > 262,140 rows (65,535 groups of 4 rows in grid.y), and the
    # faithful congestion_score failed there only after k-means and Canny had been queued.
    x = rng.random((64, 4100, 16), dtype=np.float32) * 255
    np.testing.assert_allclose(cp.asnumpy(K.gaussian_blur(_gpu(cp, x), 71, 7)), K.gaussian_blur(x, 71, 7),
                               rtol=1e-5, atol=1e-4)
    u = x.astype(np.uint8)
    np.testing.assert_array_equal(cp.asnumpy(K.gaussian_blur(_gpu(cp, u), 5, 1.1, border="reflect101")),
                                  K.gaussian_blur(u, 5, 1.1, border="reflect101"))
    depth = _depth(rng, (64, 4100, 16))
    np.testing.assert_allclose(cp.asnumpy(K.congestion_score(_gpu(cp, depth), mode="faithful")),
                               K.congestion_score(depth, mode="faithful"), rtol=1e-6, atol=1e-12)


def test_every_kernel_past_65535_images(cp, rng):
    # Before: canny, kmeans1d, congestion_score and gaussian_blur raised for more than 65,535 images
    # (grid.z / grid.y), normalize_minmax for more than 65,535 groups.
    n = 65543
    depth = _depth(rng, (n, 4, 6))
    noise = rng.integers(0, 256, (n, 4, 6), dtype=np.uint8)
    d_depth, d_noise = _gpu(cp, depth), _gpu(cp, noise)
    np.testing.assert_array_equal(cp.asnumpy(K.canny(d_noise, 50, 150)), K.canny(noise, 50, 150))
    np.testing.assert_array_equal(cp.asnumpy(K.gaussian_blur(d_noise, 3, 0.8)), K.gaussian_blur(noise, 3, 0.8))
    gpu, cpu = K.kmeans1d(d_depth, 3), K.kmeans1d(depth, 3)
    np.testing.assert_array_equal(cp.asnumpy(gpu.labels), cpu.labels)
    np.testing.assert_array_equal(cp.asnumpy(gpu.centres), cpu.centres)
    np.testing.assert_array_equal(cp.asnumpy(gpu.inertia), cpu.inertia)
    np.testing.assert_array_equal(cp.asnumpy(K.normalize_minmax(d_noise)), K.normalize_minmax(noise))
    for mode in ("fast", "faithful"):
        np.testing.assert_allclose(cp.asnumpy(K.congestion_score(d_depth, mode=mode)),
                                   K.congestion_score(depth, mode=mode), rtol=1e-6, atol=1e-12, err_msg=mode)


def test_mean_over_100000_groups(cp, rng):
    # Before: mean(x, axis=-1) on (100000, 64) raised (at most 65,535 groups per launch).
    x = (rng.random((100000, 64)) * 1000).astype(np.float32)
    gpu = K.mean(_gpu(cp, x), axis=-1)
    assert gpu.shape == (100000,) and gpu.dtype == np.float64
    np.testing.assert_allclose(cp.asnumpy(gpu), K.mean(x, axis=-1), rtol=1e-12)


# ---- item 6: near-tie k-means, bit for bit ------------------------------------------------------------------

def _fma(a: float, b: float, c: float) -> float:
    return float(Fraction(a) * Fraction(b) + Fraction(c))  # one rounding, as fma.rn.f64


def _labels_before_issue_17(hist: np.ndarray, k: int) -> np.ndarray:
    """The label table of the CUDA k-means before issue 17, emulated exactly: nvcc fused the prefix sum
    S2 += (w*d)*d into an FMA (its sm_90 PTX) and the kernel scanned every split where the CPU divides
    and conquers. The CPU path rounds w*d*d before adding."""
    x = [float(v) for v in range(256) if hist[v]]
    wt = [float(hist[v]) for v in range(256) if hist[v]]
    n = len(x)
    tw = tx = 0.0
    for i in range(n):
        tw += wt[i]
        tx += wt[i] * x[i]  # an exact product: fused or not, the same
    shift = tx / tw
    W, S1, S2 = [0.0], [0.0], [0.0]
    for i in range(n):
        d = x[i] - shift
        p = d * wt[i]
        W.append(W[i] + wt[i])
        S1.append(S1[i] + p)
        S2.append(_fma(d, p, S2[i]))

    def cost(a, b):
        ww, s = W[b + 1] - W[a], S1[b + 1] - S1[a]
        v = (S2[b + 1] - S2[a]) - s * s / ww
        return v if v > 0 else 0.0

    kk = min(k, n)
    if kk == n:
        c = x
    else:
        prev = [cost(0, j) for j in range(n)]
        arg = [[0] * n for _ in range(kk)]
        for m in range(1, kk):
            cur = prev[:]
            for j in range(m, n):
                best, bi = float("inf"), m
                for i in range(m, j + 1):
                    v = prev[i - 1] + cost(i, j)
                    if v < best:
                        best, bi = v, i
                cur[j], arg[m][j] = best, bi
            prev = cur
        c, e = [0.0] * kk, n - 1
        for m in range(kk - 1, -1, -1):
            b = 0 if m == 0 else arg[m][e]
            c[m] = (S1[e + 1] - S1[b]) / (W[e + 1] - W[b]) + shift
            e = b - 1
    lut, label = np.zeros(256, np.int64), 0
    for j in range(256):
        while label + 1 < kk and float(j) > 0.5 * (c[label] + c[label + 1]):
            label += 1
        lut[j] = label
    return lut


def _near_tie_histograms(rng, count, pixels):
    """Histograms with an exact tie in real arithmetic (a group symmetric about a centre value that may
    join either neighbour) and a far pair that makes the mean non-dyadic, so rounding breaks the tie."""
    for _ in range(count):
        hist = np.zeros(256, np.int64)
        m, centre = int(rng.integers(1, 4)), int(rng.integers(120, 200))
        offs = rng.choice(np.arange(1, 50), size=m, replace=False)
        w = rng.integers(1, 30000, size=m)
        hist[centre] = int(rng.integers(1, 30000))
        hist[centre - offs] = w
        hist[centre + offs] = w
        far = rng.choice(np.arange(0, 60), 2, replace=False)
        hist[far[0]] = int(rng.integers(1, 30000))
        hist[far[1]] = pixels - hist.sum()
        yield hist


def test_kmeans_near_ties_are_bit_exact_with_the_cpu(cp):
    # Before: FMA contraction in the prefix sums (and the inertia) plus a full scan of the splits: the
    # histograms kept here are those whose labels the pre-issue-17 arithmetic (emulated above) gets
    # different from the CPU's, about 2 % of the candidates. Now labels, centres and inertia must be
    # the CPU's to the bit (Note [Bit-exact k-means on CUDA]).
    gen = np.random.default_rng(20251125)  # fixed: the emulation picks from these candidates
    pixels, k = 300_000, 4
    chosen = []
    for hist in _near_tie_histograms(gen, 800, pixels):
        values = np.repeat(np.arange(256, dtype=np.uint8), hist)
        cpu_lut = np.zeros(256, np.int64)
        cpu_lut[values] = K.kmeans1d(values, k).labels
        if not np.array_equal(_labels_before_issue_17(hist, k)[hist > 0], cpu_lut[hist > 0]):
            chosen.append(gen.permutation(values))
    assert len(chosen) >= 5, "the emulation should find near ties the old arithmetic labels differently"
    batch = np.stack(chosen).reshape(len(chosen), 500, 600)
    gpu, cpu = K.kmeans1d(_gpu(cp, batch), k), K.kmeans1d(batch, k)
    np.testing.assert_array_equal(cp.asnumpy(gpu.labels), cpu.labels)
    np.testing.assert_array_equal(cp.asnumpy(gpu.centres), cpu.centres)
    np.testing.assert_array_equal(cp.asnumpy(gpu.inertia), cpu.inertia)
    # The same through the congestion chain's label image (the fused k-means of congestion_score).
    _, inter = K.congestion_score(_gpu(cp, batch), return_intermediates=True)
    np.testing.assert_array_equal(cp.asnumpy(inter["labels"]), cpu.labels)


def test_kmeans_random_histograms_any_k_are_bit_exact(cp, rng):
    for k in (1, 2, 5, 17, 32):
        n = int(rng.integers(1, 9))
        batch = np.empty((n, 61, 67), np.uint8)
        for i in range(n):
            levels = rng.choice(256, int(rng.integers(1, 257)), replace=False)
            batch[i] = rng.choice(levels, (61, 67))
        gpu, cpu = K.kmeans1d(_gpu(cp, batch), k), K.kmeans1d(batch, k)
        np.testing.assert_array_equal(cp.asnumpy(gpu.labels), cpu.labels, err_msg=f"k={k} seed {SEED}")
        np.testing.assert_array_equal(cp.asnumpy(gpu.centres), cpu.centres, err_msg=f"k={k} seed {SEED}")
        np.testing.assert_array_equal(cp.asnumpy(gpu.inertia), cpu.inertia, err_msg=f"k={k} seed {SEED}")


# ---- item 7: taps and weights without a host wait ------------------------------------------------------------

def test_taps_and_weights_reach_the_device_without_the_host_waiting(rng):
    # The taps (blur) and the adjoint weights (fast score) used to be copied from pageable memory. The
    # driver stages such a copy and returns once the whole source is staged: a copy larger than its
    # staging buffers waits for the stream to reach it. Here the stream is busy with a ~2 s spin when
    # the call is made; the call must return while the spin still runs (the event after it not yet
    # complete). The score's weights are (h + w) doubles: 8 MB for a 4 x 1,000,000 image, where the old
    # code waited; the blur's 8 KB of taps fit a staging buffer, so that half checks the new path only.
    torch = pytest.importorskip("torch")
    depth = torch.from_numpy(_depth(rng, (1, 4, 1_000_000))).cuda()
    x = torch.from_numpy(rng.random((2, 300, 400), dtype=np.float32)).cuda()
    K.congestion_score(depth)  # first calls: pool, staging blocks and module set up
    K.gaussian_blur(x, 1001, 150.0)
    torch.cuda.synchronize()
    for call in (lambda: K.congestion_score(depth), lambda: K.gaussian_blur(x, 1001, 150.0)):
        spin_done = torch.cuda.Event()
        torch.cuda._sleep(4_000_000_000)  # ~2 s on the current stream, the one the kernels use
        spin_done.record()
        result = call()
        assert not spin_done.query(), "the call waited for the busy stream"
        torch.cuda.synchronize()
        assert result is not None
    np.testing.assert_allclose(K.congestion_score(depth).cpu().numpy(), K.congestion_score(depth.cpu().numpy()),
                               rtol=1e-6)
    np.testing.assert_allclose(K.gaussian_blur(x, 1001, 150.0).cpu().numpy(),
                               K.gaussian_blur(x.cpu().numpy(), 1001, 150.0), rtol=1e-5, atol=1e-4)
