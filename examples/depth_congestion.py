"""Seed 003's depth postprocess done right, on synthetic depth images.

The seed ran, per image, on 8 Python threads: scikit-learn KMeans(4) on an unseeded 5 % sample ->
label map -> min-max to uint8 -> cv2.Canny -> 71x71 GaussianBlur (sigma 7, replicated borders) ->
mean, ~47 ms per 512x1024 image. Here the whole chain is one call per batch: exact k-means on every
pixel (deterministic, labels sorted by centre), bit-exact Canny, and the blur's mean computed from its
linearity without building the blurred image. On a CUDA array (CuPy/PyTorch) the same call runs on the
GPU, on the array's current stream.

    python examples/depth_congestion.py [--batch 16] [--height 512] [--width 1024]
"""
from __future__ import annotations

import argparse
import time
import warnings

from _needs import need

need("cv2", "sklearn")
import cv2  # noqa: E402
import numpy as np

from gpufleet import kernels as K


def synthetic_depth(rng, n, h, w):
    """Depth-like uint8 images: a ground ramp, a ripple and a few near obstacles."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w), np.uint8)
    for i in range(n):
        d = 60 + 120 * yy / (h - 1) + 40 * np.sin(xx / w * (4 + i % 5))
        for _ in range(rng.integers(3, 12)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, min(h, w) // 3)
            d[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] -= rng.integers(20, 80)
        out[i] = np.clip(d + rng.normal(0, 4, (h, w)), 0, 255)
    return out


def seed_postprocess(depth, rng):
    """The seed's chain, for comparison (scikit-learn + OpenCV + NumPy)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    h, w = depth.shape
    X = depth.reshape(-1, 1)
    idx = rng.choice(len(X), int(len(X) * 0.05), replace=False)
    with threadpool_limits(limits=1):  # its fastest setting on a 25k-value sample
        km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(X[idx])
        lm = km.predict(X).reshape(h, w).astype(np.float32)
    shown = ((lm - lm.min()) * 255 / (lm.max() - lm.min())).astype(np.uint8)
    blurred = cv2.GaussianBlur(cv2.Canny(shown, 100, 200).astype(np.float32), (71, 71), 7,
                               borderType=cv2.BORDER_REPLICATE)
    return float(np.mean(blurred))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(3)
    depth = synthetic_depth(rng, args.batch, args.height, args.width)

    t = time.perf_counter()
    scores = K.congestion_score(depth)  # one score per image, float64 (N,)
    ours_ms = (time.perf_counter() - t) * 1e3
    print(f"gpufleet.kernels.congestion_score: {args.batch} images of {args.height}x{args.width} in {ours_ms:.1f} ms "
          f"({ours_ms / args.batch:.2f} ms/image, {K.get_num_threads()} threads)")
    print("scores:", np.array2string(scores, precision=3, max_line_width=100))

    # The faithful mode builds the blurred map as the seed does; both agree to ~1e-7 relative.
    faithful = K.congestion_score(depth[:2], mode="faithful")
    print("fast vs faithful, max relative difference:", float(np.max(np.abs(scores[:2] / faithful - 1))))

    # The steps are usable on their own and match OpenCV.
    score, parts = K.congestion_score(depth[0], return_intermediates=True)
    assert np.array_equal(parts["edges"], cv2.Canny(parts["normalized"], 100, 200))
    print("image 0: centres", np.round(parts["centres"], 1), "edge pixels", int((parts["edges"] > 0).sum()))

    # The seed, for comparison: slower, and its score moves from run to run (unseeded 5 % sample,
    # labels numbered in k-means++ selection order).
    warnings.filterwarnings("ignore")
    import sklearn.cluster  # noqa: F401 - imported before timing
    t = time.perf_counter()
    runs = [seed_postprocess(depth[0], np.random.default_rng()) for _ in range(3)]
    seed_ms = (time.perf_counter() - t) * 1e3 / 3
    print(f"seed chain on image 0: {seed_ms:.1f} ms/image, scores over 3 runs: {np.round(runs, 4)}; gpufleet: "
          f"{score:.4f} every run ({seed_ms / (ours_ms / args.batch):.0f}x faster per image)")


if __name__ == "__main__":
    main()
