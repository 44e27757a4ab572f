"""gpufleet.kernels against its references: OpenCV (blur, Canny), scikit-learn and brute force
(k-means), NumPy (min-max, mean) and the seed-003 chain rebuilt from OpenCV. Fresh random inputs of
awkward sizes each run (the seed is printed on failure through the test id's parameters)."""
from __future__ import annotations

import itertools
import zlib
import os

import cv2
import numpy as np
import pytest

import gpufleet
from gpufleet import kernels as K

# scikit-learn may warn about threadpool or convergence details we do not test.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# Fresh inputs every run; set GPUFLEET_TEST_SEED to replay a failure (the seed is in the messages).
SEED = int(os.environ.get("GPUFLEET_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
BORDERS = {"replicate": cv2.BORDER_REPLICATE, "reflect101": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}
# 1xN, Nx1, below 71, primes, and wider than tall.
SHAPES = [(1, 97), (89, 1), (1, 1), (2, 3), (13, 17), (61, 67), (70, 71), (127, 331), (256, 509)]


@pytest.fixture
def rng(request):
    """A fresh generator per test; the seed is in the failure message via the assertion helper."""
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def random_image(rng, shape, dtype):
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return (rng.random(shape, dtype=np.float32) * 255).astype(np.float32)


def blocky_labels(rng, shape, k=4):
    """A label map with straight and diagonal steps (plateaus, as the seed's k-means images)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros(shape, np.int32)
    for _ in range(6):
        a, b, c = rng.normal(size=3)
        img += ((a * (yy - h / 2) + b * (xx - w / 2) + c * min(h, w) / 4) > 0)
    img += (xx > rng.integers(0, w)) & (yy > rng.integers(0, h))  # axis-aligned rectangle
    return (img % k).astype(np.int32)


# ---- gaussian_blur -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("border", list(BORDERS))
def test_blur_float32_matches_opencv(rng, shape, border):
    x = random_image(rng, shape, np.float32)
    ours = K.gaussian_blur(x, 71, 7, border=border)
    ref = cv2.GaussianBlur(x, (71, 71), 7, borderType=BORDERS[border])
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * 255, err_msg=f"seed {SEED}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("border", list(BORDERS))
def test_blur_uint8_is_bit_exact_with_opencv(rng, shape, border):
    # Note [uint8 blur is integer arithmetic]: identical, better than the 1-level acceptance bound.
    x = random_image(rng, shape, np.uint8)
    for ksize, sigma in [(71, 7), (5, 1.1), (0, 2.3)]:
        ours = K.gaussian_blur(x, ksize, sigma, border=border)
        ref = cv2.GaussianBlur(x, (ksize, ksize), sigma, borderType=BORDERS[border])
        np.testing.assert_array_equal(ours, ref, err_msg=f"ksize {ksize} sigma {sigma} seed {SEED}")


def test_blur_anisotropic_and_derived_sizes(rng):
    x = random_image(rng, (53, 79), np.float32)
    for ksize, s, sy in [((9, 3), 2.0, 0.7), ((0, 0), 1.3, 2.9), ((1, 15), 0.8, 3.0)]:
        ours = K.gaussian_blur(x, ksize, s, sigma_y=sy, border="reflect101")
        ref = cv2.GaussianBlur(x, ksize, s, sigmaY=sy, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * 255)


def test_blur_batch_equals_per_image(rng):
    x = random_image(rng, (3, 41, 37), np.float32)
    batch = K.gaussian_blur(x, 15, 3)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], K.gaussian_blur(x[i], 15, 3))


def test_blur_large_image_2048x4096(rng):
    x = random_image(rng, (2048, 4096), np.float32)
    ours = K.gaussian_blur(x, 71, 7)
    ref = cv2.GaussianBlur(x, (71, 71), 7, borderType=cv2.BORDER_REPLICATE)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * 255)


def test_blur_taps_match_opencv():
    # The float taps cv2 uses, through a 1-row impulse (the row pass alone, exact in float).
    for n, s in [(71, 7.0), (3, 0.5), (31, 4.2)]:
        x = np.zeros((1, 2 * n + 1), np.float32)
        x[0, n] = 1
        ours = K.gaussian_blur(x, (n, 1), s, border="constant")[0, n - n // 2:n + n // 2 + 1]
        np.testing.assert_array_equal(ours, cv2.getGaussianKernel(n, s, ktype=cv2.CV_32F).ravel())


@pytest.mark.parametrize("bad, match", [
    (dict(ksize=4, sigma=1.0), "odd"),
    (dict(ksize=-3, sigma=1.0), "odd"),
    (dict(ksize=5, sigma=0.0), "sigma"),
    (dict(ksize=5, sigma=-1.0), "sigma"),
    (dict(ksize=5, sigma=float("nan")), "sigma"),
    (dict(ksize=5, sigma=1.0, sigma_y=-2.0), "sigma_y"),
    (dict(ksize=5, sigma=1.0, border="wrap"), "border"),
    (dict(ksize=(3, 4, 5), sigma=1.0), "ksize"),
])
def test_blur_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        K.gaussian_blur(np.zeros((8, 8), np.float32), **bad)


def test_blur_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float32 or uint8"):
        K.gaussian_blur(np.zeros((8, 8), np.float64), 3, 1)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        K.gaussian_blur(np.zeros((2, 2, 8, 8), np.float32), 3, 1)
    with pytest.raises(ValueError, match="non-empty"):
        K.gaussian_blur(np.zeros((0, 8), np.float32), 3, 1)


# ---- canny ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES + [(3, 2)])
def test_canny_identical_to_opencv_on_random_images(rng, shape):
    noise = random_image(rng, shape, np.uint8)
    smooth = cv2.GaussianBlur(noise, (5, 5), 1.5)
    for img, (lo, hi), l2 in itertools.product([noise, smooth], [(100, 200), (20.7, 60.2), (250, 40)], [False, True]):
        np.testing.assert_array_equal(K.canny(img, lo, hi, l2gradient=l2), cv2.Canny(img, lo, hi, L2gradient=l2),
                                      err_msg=f"thresholds {lo},{hi} l2 {l2} seed {SEED}")


@pytest.mark.parametrize("shape", [(64, 64), (97, 211), (5, 301), (301, 5)])
def test_canny_identical_to_opencv_on_label_maps(rng, shape):
    labels = blocky_labels(rng, shape)
    img = ((labels - labels.min()) * 255 / max(1, labels.max() - labels.min())).astype(np.uint8)
    for lo, hi in [(100, 200), (50, 100), (0, 1)]:
        np.testing.assert_array_equal(K.canny(img, lo, hi), cv2.Canny(img, lo, hi))


def test_canny_batch_and_large(rng):
    big = cv2.GaussianBlur(random_image(rng, (2048, 4096), np.uint8), (7, 7), 2)
    np.testing.assert_array_equal(K.canny(big, 10, 30), cv2.Canny(big, 10, 30))
    batch = np.stack([blocky_labels(rng, (40, 50)).astype(np.uint8) * 60 for _ in range(3)])
    out = K.canny(batch, 100, 200)
    for i in range(3):
        np.testing.assert_array_equal(out[i], cv2.Canny(batch[i], 100, 200))


@pytest.mark.parametrize("l2", [False, True])
def test_canny_weak_chains_cross_row_bands(rng, l2):
    """The CPU canny classifies and grows row bands in parallel (65536 // W + 1 rows each), then grows
    across bands: weak edges running through every band, seeded around one random row, must come out
    whole, as in cv2.Canny."""
    h, w = int(rng.integers(400, 600)), int(rng.integers(700, 1000))
    yy, xx = np.mgrid[0:h, 0:w]
    # Two weak steps through every row band, a vertical one and a 45-degree one, whose contrast rises
    # smoothly to strong around one random row: the only seeds.
    seed_row = int(rng.integers(0, h))
    contrast = 25 + 65 * np.exp(-(((yy - seed_row) / 12.0) ** 2))
    img = 60 + contrast * (xx >= int(rng.integers(10, w - 10))) + contrast * (xx - yy >= int(rng.integers(10, w - h - 10)))
    img = img.astype(np.uint8)
    batch = np.stack([img, np.ascontiguousarray(img[::-1])])
    for lo, hi in [(60, 200), (40, 150)]:
        out = K.canny(batch, lo, hi, l2gradient=l2)
        for i in range(2):
            ref = cv2.Canny(batch[i], lo, hi, L2gradient=l2)
            assert np.count_nonzero(ref.any(axis=1)) > 0.9 * h, "the reference's edges must run through every band"
            np.testing.assert_array_equal(out[i], ref, err_msg=f"{h}x{w} thresholds {lo},{hi} l2 {l2} seed {SEED}")


def test_canny_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        K.canny(np.zeros((8, 8), np.float32), 1, 2)
    with pytest.raises(ValueError, match="finite"):
        K.canny(np.zeros((8, 8), np.uint8), float("nan"), 2)


# ---- kmeans1d ------------------------------------------------------------------------------------

def brute_force_inertia(values, k):
    """The optimum over every split of the sorted distinct values into k contiguous runs."""
    x = np.sort(values.astype(np.float64))
    u = np.unique(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, len(u)), min(k, len(u)) - 1):
        bounds = [u[0] - 1] + [u[c - 1] for c in cuts] + [u[-1]]
        total = 0.0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            seg = x[(x > lo) & (x <= hi)]
            total += ((seg - seg.mean()) ** 2).sum()
        best = min(best, total)
    return best


@pytest.mark.parametrize("n", [1, 2, 5, 9, 14])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_kmeans_exact_equals_brute_force(rng, n, dtype):
    values = (rng.integers(0, 12, n) * 7).astype(dtype) if dtype == np.uint8 else rng.normal(size=n).astype(dtype)
    for k in (1, 2, 3, 4):
        r = K.kmeans1d(values, k)
        assert r.labels.shape == values.shape and r.labels.dtype == np.int32
        assert r.inertia == pytest.approx(brute_force_inertia(values, k), rel=1e-9, abs=1e-9)
        found = np.unique(r.labels)
        c = r.centres[: len(found)]
        assert np.all(np.diff(c) > 0), "centres increase with the label"
        # every value takes its nearest centre
        d = np.abs(values.astype(np.float64)[:, None] - c[None, :])
        np.testing.assert_array_equal(d[np.arange(n), r.labels], d.min(axis=1))


def test_kmeans_exact_beats_sklearn(rng):
    from sklearn.cluster import KMeans

    depth = np.clip(rng.normal(110, 45, (61, 89)), 0, 255).astype(np.uint8)
    depth[:20] = np.clip(depth[:20] // 3 + 200, 0, 255)
    for values in (depth, depth.astype(np.float32) / 7):
        r = K.kmeans1d(values, 4)
        sk = KMeans(n_clusters=4, n_init=10, random_state=0).fit(values.reshape(-1, 1).astype(np.float64))
        assert r.inertia <= sk.inertia_ * (1 + 1e-12)
        labels = r.labels.ravel()
        recomputed = sum(((values.ravel()[labels == i] - r.centres[i]) ** 2).sum() for i in range(4))
        assert r.inertia == pytest.approx(recomputed, rel=1e-9)


def test_kmeans_lloyd_close_to_sklearn_and_seeded(rng):
    from sklearn.cluster import KMeans

    values = np.concatenate([rng.normal(m, 3, 500) for m in (10, 50, 90, 200)]).astype(np.float32)
    r1 = K.kmeans1d(values, 4, method="lloyd", seed=7)
    r2 = K.kmeans1d(values, 4, method="lloyd", seed=7)
    np.testing.assert_array_equal(r1.labels, r2.labels)
    sk = KMeans(n_clusters=4, n_init=10, random_state=0).fit(values.reshape(-1, 1).astype(np.float64))
    assert r1.inertia <= sk.inertia_ * 1.01
    assert r1.inertia >= K.kmeans1d(values, 4).inertia * (1 - 1e-12)


def test_kmeans_sample_and_batches(rng):
    batch = rng.integers(0, 256, (3, 37, 41), dtype=np.uint8)
    r = K.kmeans1d(batch, 3)
    assert r.centres.shape == (3, 3) and r.inertia.shape == (3,)
    for i in range(3):
        one = K.kmeans1d(batch[i], 3)
        np.testing.assert_array_equal(r.labels[i], one.labels)
        np.testing.assert_allclose(r.centres[i], one.centres)
    s1 = K.kmeans1d(batch[0], 3, sample=0.05, seed=11)
    s2 = K.kmeans1d(batch[0], 3, sample=0.05, seed=11)
    np.testing.assert_array_equal(s1.labels, s2.labels)
    # Centres from a 5 % sample, labels and inertia over every pixel: never better than the optimum.
    exact0 = K.kmeans1d(batch[0], 3)
    assert s1.inertia >= exact0.inertia * (1 - 1e-12)


def test_kmeans_degenerate_inputs():
    r = K.kmeans1d(np.full((4, 6), 9, np.uint8), 4)
    assert (r.labels == 0).all() and r.inertia == 0 and r.centres[0] == 9 and np.isnan(r.centres[1:]).all()
    r = K.kmeans1d(np.array([3.0, 1.0, 3.0]), 4)
    np.testing.assert_array_equal(r.labels, [1, 0, 1])
    np.testing.assert_array_equal(r.centres[:2], [1.0, 3.0])
    assert r.inertia == 0


@pytest.mark.parametrize("values, kwargs, match", [
    (np.array([1.0, np.nan]), {}, "finite"),
    (np.array([1.0, np.inf]), {}, "finite"),
    (np.zeros(0, np.float32), {}, "empty"),
    (np.zeros(5, np.int16), {}, "dtype"),
    (np.zeros(5, np.float32), {"k": 0}, "k=0"),
    (np.zeros(5, np.float32), {"method": "em"}, "method"),
    (np.zeros(5, np.float32), {"sample": 1.5}, "sample"),
    (np.zeros(5, np.float32), {"n_init": 0}, "n_init"),
])
def test_kmeans_rejects_bad_input(values, kwargs, match):
    args = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        K.kmeans1d(values, args.pop("k"), **args)


# ---- normalize_minmax and mean -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float32, np.float64])
def test_normalize_minmax_is_the_seed_formula(rng, dtype):
    x = (rng.random((37, 53)) * 100 - 20).astype(dtype) if dtype != np.uint8 else random_image(rng, (37, 53), dtype)
    f = x.astype(np.float32)
    seed = (f - np.min(f)) * 255 / (np.max(f) - np.min(f))
    np.testing.assert_array_equal(K.normalize_minmax(x), seed.astype(np.uint8))
    np.testing.assert_array_equal(K.normalize_minmax(x, dtype=np.float32), seed)
    labels = rng.integers(0, 4, (3, 19, 23)).astype(np.int32)
    out = K.normalize_minmax(labels)
    for i in range(3):
        f = labels[i].astype(np.float32)
        np.testing.assert_array_equal(out[i], ((f - f.min()) * 255 / (f.max() - f.min())).astype(np.uint8))


def test_normalize_minmax_constant_and_nan():
    assert (K.normalize_minmax(np.full((3, 4), 5.0)) == 0).all()
    with pytest.raises(ValueError, match="NaN"):
        K.normalize_minmax(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="dtype"):
        K.normalize_minmax(np.ones((2, 2)), dtype=np.int16)


def test_mean_accumulates_in_double(rng):
    x = rng.random((3, 129, 257)).astype(np.float32) + 1000
    assert K.mean(x) == pytest.approx(x.astype(np.float64).mean(), rel=1e-15)
    np.testing.assert_allclose(K.mean(x, axis=(1, 2)), x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-15)
    np.testing.assert_allclose(K.mean(x, axis=0), x.astype(np.float64).mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(K.mean(x, axis=(-1, 0)), x.astype(np.float64).mean(axis=(2, 0)), rtol=1e-15)
    u = np.full((1000, 1000), 255, np.uint8)
    assert K.mean(u) == 255.0
    with pytest.raises(ValueError, match="out of range"):
        K.mean(x, axis=3)


# ---- congestion_score: the seed-003 chain --------------------------------------------------------

def seed_chain_from_labels(label_map):
    """The seed's steps after k-means, with OpenCV and NumPy, on a given label map."""
    lm = label_map.astype(np.float32)
    shown = ((lm - np.min(lm)) * 255 / (np.max(lm) - np.min(lm))).astype(np.uint8)
    edges = cv2.Canny(shown, 100, 200)
    blurred = cv2.GaussianBlur(edges.astype(np.float32), (71, 71), 7, borderType=cv2.BORDER_REPLICATE)
    return shown, edges, blurred, float(np.mean(blurred, dtype=np.float64))


def synthetic_depth(rng, shape):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    depth = 60 + 120 * yy / max(1, h - 1) + 40 * np.sin(xx / max(1, w) * 6)
    for _ in range(5):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(h, w) // 3))
        depth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] -= 50
    return np.clip(depth + rng.normal(0, 4, shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(1, 211), (97, 1), (67, 71), (128, 257), (509, 1021)])
def test_congestion_score_matches_seed_chain_on_same_labels(rng, shape):
    depth = synthetic_depth(rng, shape)
    score, inter = K.congestion_score(depth, return_intermediates=True)
    faithful, finter = K.congestion_score(depth, mode="faithful", return_intermediates=True)
    shown, edges, blurred, ref = seed_chain_from_labels(inter["labels"])
    np.testing.assert_array_equal(inter["normalized"], shown)
    np.testing.assert_array_equal(inter["edges"], edges)
    np.testing.assert_allclose(finter["blurred"], blurred, rtol=1e-6, atol=1e-6 * 255)
    assert score == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert faithful == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert score == pytest.approx(faithful, rel=1e-6, abs=1e-9)
    # labels are the exact k-means of the depth
    km = K.kmeans1d(depth, 4)
    np.testing.assert_array_equal(inter["labels"], km.labels)


def test_congestion_score_batch_float_depth_and_large(rng):
    batch = np.stack([synthetic_depth(rng, (61, 83)) for _ in range(4)])
    scores = K.congestion_score(batch)
    assert scores.shape == (4,) and scores.dtype == np.float64
    for i in range(4):
        assert scores[i] == pytest.approx(K.congestion_score(batch[i]), rel=1e-12)
    depth = synthetic_depth(rng, (2048, 4096))
    s = K.congestion_score(depth)
    assert s == pytest.approx(K.congestion_score(depth, mode="faithful"), rel=1e-6)
    assert K.congestion_score(depth.astype(np.float32)) == pytest.approx(s, rel=1e-12)
    assert K.congestion_score(np.full((30, 40), 17, np.uint8)) == 0.0


def test_congestion_score_rejects_bad_arguments():
    d = np.zeros((16, 16), np.uint8)
    for kwargs, match in [({"mode": "quick"}, "mode"), ({"ksize": 70}, "odd"), ({"sigma": 0}, "sigma"),
                          ({"k": 0}, "k=0"), ({"canny_thresholds": (1,)}, "pair")]:
        with pytest.raises(ValueError, match=match):
            K.congestion_score(d, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        K.congestion_score(np.array([[1.0, np.nan], [2.0, 3.0]], np.float32))


# ---- threads, input types -------------------------------------------------------------------------

def test_results_do_not_depend_on_thread_count(rng):
    depth = synthetic_depth(rng, (131, 257))
    x = random_image(rng, (131, 257), np.float32)
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        one = (K.gaussian_blur(x, 71, 7), K.canny(depth, 20, 50), K.congestion_score(depth))
        K.set_num_threads(3)
        assert K.get_num_threads() == 3
        three = (K.gaussian_blur(x, 71, 7), K.canny(depth, 20, 50), K.congestion_score(depth))
    finally:
        K.set_num_threads(before)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])
    assert one[2] == pytest.approx(three[2], rel=1e-12)
    with pytest.raises(ValueError, match="thread count"):
        K.set_num_threads(-1)


def test_accepts_buffer_protocol_array_interface_and_views(rng):
    x = random_image(rng, (40, 60), np.float32)
    ref = K.gaussian_blur(x, 5, 1.0)
    np.testing.assert_array_equal(K.gaussian_blur(memoryview(x), 5, 1.0), ref)

    class HasArray:
        def __array__(self, dtype=None, copy=None):
            return x

    np.testing.assert_array_equal(K.gaussian_blur(HasArray(), 5, 1.0), ref)
    big = random_image(rng, (80, 120), np.float32)
    view = big[::2, ::2]  # non-contiguous
    np.testing.assert_array_equal(K.gaussian_blur(view, 5, 1.0), K.gaussian_blur(view.copy(), 5, 1.0))
    with pytest.raises(TypeError):
        K.gaussian_blur(None, 5, 1.0)


def test_memory_stats_without_a_device():
    # gpufleet.kernels.memory_stats() reads counters only: no device is touched before a kernel ran there.
    if gpufleet.build_info()["cuda"]:
        if gpufleet.topology().source not in ("none", "simulated"):
            pytest.skip("a real device may already hold kernel memory (tests/python/test_cuda_lifetimes.py)")
        assert K.memory_stats() == {"backend": "", "used_bytes": 0, "reserved_bytes": 0, "release_threshold": 0,
                                    "live_results": 0, "failed_releases": 0, "held_inputs": 0}
    else:
        with pytest.raises(ValueError, match="no CUDA support"):
            K.memory_stats()
    with pytest.raises(ValueError, match="expects a CUDA device, got 'cpu'"):
        K.memory_stats("cpu")


# ---- CUDA against the CPU path (the GPU machine) ---------------------------------------------------

requires_cuda = pytest.mark.skipif(
    not gpufleet.build_info()["cuda"] or gpufleet.topology().source in ("none", "simulated"),
    reason="needs a CUDA device and a CUDA build")


CUDA_SHAPES = [(1, 97), (89, 1), (2, 3), (61, 67), (97, 211), (256, 509), (1024, 2048)]


def _on_gpu(lib, a):
    if lib.__name__ == "cupy":
        return lib.asarray(a)
    return lib.from_numpy(np.ascontiguousarray(a)).cuda()


def _back(lib, a, like=None):
    """The result as NumPy, after checking it is the input library's own CUDA array."""
    if lib.__name__ == "cupy":
        assert isinstance(a, lib.ndarray), type(a)
        if like is not None:
            assert a.device == like.device
        return lib.asnumpy(a)
    assert isinstance(a, lib.Tensor) and a.is_cuda, type(a)
    if like is not None:
        assert a.device == like.device
    return a.cpu().numpy()


@requires_cuda
@pytest.mark.parametrize("lib_name", ["cupy", "torch"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_matches_cpu(rng, lib_name, shape):
    lib = pytest.importorskip(lib_name)
    n = 1 if shape[0] * shape[1] > 100_000 else 3
    depth = np.stack([synthetic_depth(rng, shape) for _ in range(n)])
    x = random_image(rng, (n,) + shape, np.float32)
    d_depth, d_x = _on_gpu(lib, depth), _on_gpu(lib, x)
    msg = f"{lib_name} {n}x{shape} seed {SEED}"
    for ksize, sigma in [(71, 7.0), (5, 1.2), (0, 2.5)]:
        for border in BORDERS:
            np.testing.assert_allclose(_back(lib, K.gaussian_blur(d_x, ksize, sigma, border=border), d_x),
                                       K.gaussian_blur(x, ksize, sigma, border=border), rtol=1e-5, atol=1e-4,
                                       err_msg=f"blur f32 {ksize} {sigma} {border} {msg}")
            np.testing.assert_array_equal(_back(lib, K.gaussian_blur(d_depth, ksize, sigma, border=border)),
                                          K.gaussian_blur(depth, ksize, sigma, border=border),
                                          err_msg=f"blur u8 {ksize} {sigma} {border} {msg}")
    noise = random_image(rng, (n,) + shape, np.uint8)
    for img in (depth, noise):
        for (lo, hi), l2 in itertools.product([(20, 50), (100, 200), (0, 1)], [False, True]):
            np.testing.assert_array_equal(_back(lib, K.canny(_on_gpu(lib, img), lo, hi, l2gradient=l2)),
                                          K.canny(img, lo, hi, l2gradient=l2), err_msg=f"canny {lo},{hi},{l2} {msg}")
    for k in (1, 4, 7):  # Note [Bit-exact k-means on CUDA]: the CPU's values to the bit
        gpu, cpu = K.kmeans1d(d_depth, k), K.kmeans1d(depth, k)
        np.testing.assert_array_equal(_back(lib, gpu.labels), cpu.labels, err_msg=f"kmeans k={k} {msg}")
        np.testing.assert_array_equal(_back(lib, gpu.centres), cpu.centres, err_msg=f"kmeans k={k} {msg}")
        np.testing.assert_array_equal(_back(lib, gpu.inertia), cpu.inertia, err_msg=f"kmeans k={k} {msg}")
    np.testing.assert_array_equal(_back(lib, K.normalize_minmax(d_depth)), K.normalize_minmax(depth))
    np.testing.assert_array_equal(_back(lib, K.normalize_minmax(d_x)), K.normalize_minmax(x))
    np.testing.assert_allclose(_back(lib, K.mean(d_x, axis=(1, 2))), K.mean(x, axis=(1, 2)), rtol=1e-12)
    for mode in ("fast", "faithful"):
        np.testing.assert_allclose(_back(lib, K.congestion_score(d_depth, mode=mode)), K.congestion_score(depth),
                                   rtol=1e-6, err_msg=f"congestion {mode} {msg}")
