"""gpufleet.kernels on the CPU against the seed-003 chain and OpenCV, measured in one run.

Prints one row per case: ours (ms), the baseline (ms) and baseline/ours. Both sides use the same
thread count (gpufleet.kernels.set_num_threads and cv2.setNumThreads; scikit-learn uses its own
OpenMP pool limited to one thread, its fastest setting for the seed's 5 % sample). Usage: python benchmarks/kernels_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import cv2
import numpy as np
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

import gpufleet
from gpufleet import kernels as K


def timed(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def timed_pair(f, g, reps, warmup=2):
    """Medians (ms) of f and g called alternately, so that a load change hits both sides alike."""
    for _ in range(warmup):
        f()
        g()
    a, b = [], []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        g()
        b.append(time.perf_counter() - t)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def synthetic_depth(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    depth = 60 + 120 * yy / (h - 1) + 40 * np.sin(xx / w * 6)
    for _ in range(8):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, min(h, w) // 3)
        depth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] -= 50
    return np.clip(depth + rng.normal(0, 4, (h, w)), 0, 255).astype(np.uint8)


def seed_chain(depth, rng):
    """Seed 003's cpu_postprocess on a uint8 depth image (scikit-learn + OpenCV + NumPy). scikit-learn
    runs single-threaded: on a 25k-value sample its OpenMP threads only add overhead, and on a shared
    machine they make the baseline erratic; this is the baseline's best case."""
    h, w = depth.shape
    X = depth.reshape(-1, 1)
    idx = rng.choice(len(X), int(len(X) * 0.05), replace=False)
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(X[idx])
        label_map = km.predict(X).reshape(h, w).astype(np.float32)
    shown = ((label_map - np.min(label_map)) * 255 / (np.max(label_map) - np.min(label_map))).astype(np.uint8)
    edges = cv2.Canny(shown, 100, 200).astype(np.float32)
    blurred = cv2.GaussianBlur(edges, (71, 71), 7, borderType=cv2.BORDER_REPLICATE)
    return np.mean(blurred)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    threads = K.get_num_threads()
    cv2.setNumThreads(threads)
    rng = np.random.default_rng(0)
    reps = 3 if args.quick else 9
    print(f"gpufleet {gpufleet.__version__} kernels on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {threads} threads (cv2.setNumThreads({threads})), OpenCV {cv2.__version__}")
    print(f"{'case':44s} {'ours ms':>9s} {'baseline ms':>12s} {'ratio':>7s}")
    rows = []
    for h, w in [(512, 1024), (1024, 2048)]:
        depth = synthetic_depth(rng, h, w)
        x = (rng.random((h, w)) * 255).astype(np.float32)
        edges_in = K.normalize_minmax(K.kmeans1d(depth, 4).labels)
        rows.append((f"chain {h}x{w} vs seed (sklearn+OpenCV)", timed(lambda: K.congestion_score(depth), reps),
                     timed(lambda: seed_chain(depth, rng), max(3, reps // 3))))
        rows.append((f"chain faithful {h}x{w} vs seed", timed(lambda: K.congestion_score(depth, mode="faithful"), reps),
                     timed(lambda: seed_chain(depth, rng), max(3, reps // 3))))
        rows.append((f"gaussian_blur f32 71x71 {h}x{w} vs cv2", timed(lambda: K.gaussian_blur(x, 71, 7), reps),
                     timed(lambda: cv2.GaussianBlur(x, (71, 71), 7, borderType=cv2.BORDER_REPLICATE), reps)))
        # Canny takes about a millisecond: more repetitions, interleaved, for a steady median.
        creps = 5 * reps
        rows.append((f"canny label image {h}x{w} vs cv2.Canny",
                     *timed_pair(lambda: K.canny(edges_in, 100, 200), lambda: cv2.Canny(edges_in, 100, 200), creps)))
        smooth = cv2.GaussianBlur(depth, (5, 5), 1.5)
        rows.append((f"canny depth {h}x{w} (20,60) vs cv2.Canny",
                     *timed_pair(lambda: K.canny(smooth, 20, 60), lambda: cv2.Canny(smooth, 20, 60), creps)))
    for name, ours, base in rows:
        print(f"{name:44s} {ours:9.2f} {base:12.2f} {base / ours:7.2f}x")


if __name__ == "__main__":
    main()
