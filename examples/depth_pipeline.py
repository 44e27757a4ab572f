"""Seed 003, end to end, as a gpufleet pipeline.

The seed reads image ids from a database (four faces per panorama: xm, xp, zm, zp), runs a batched
depth model on the GPU, hands each depth map through a Queue(maxsize=36) to 8 CPU threads that compute
a "congestion score" (k-means(4) -> label map -> min-max to uint8 -> Canny -> 71x71 Gaussian blur ->
mean), and writes every score with a fresh SQLAlchemy session, until the connection resets hours in.

Here: a SQLite index of synthetic panoramas written to disk, then

    source (unscored faces, from the index: a re-run resumes where it stopped)
      -> map(load image, 4 threads)
      -> batch(8, max_delay)          -> gpu(depth model, one per device; the CPU when there is none)
      -> unbatch()                    -> map(congestion score, 4 threads, gpufleet kernels without the GIL)
      -> sink(SqlSink: one writer, batched keyed upserts into the same index table)

and the per-stage report (which stage limits throughput). Runs anywhere: PyTorch for the depth model
when it is installed (on the GPU when there is one), else a small NumPy stand-in.

    python examples/depth_pipeline.py [--ids 48] [--size 96x128] [--workdir DIR] [--trace t.json] [--plot p.png]
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time

from _needs import need

need("cv2", "sklearn", "matplotlib")
import cv2  # noqa: E402
import numpy as np

import gpufleet
from gpufleet.sinks import SqlSink

FACES = ("xm", "xp", "zm", "zp")


# ---- the data: a SQLite index and images on disk (synthetic) ---------------------------------------
def make_dataset(workdir: str, ids: int, size: tuple[int, int], seed: int = 0) -> str:
    """Writes `ids` panoramas (four JPEG faces each) and the index table; returns the database path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(workdir, "project"), exist_ok=True)
    db = os.path.join(workdir, "index.db")
    h, w = size
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE IF NOT EXISTS panoramas (id INTEGER PRIMARY KEY, panorama_sid TEXT, "
                  + ", ".join(f"{f}_depth_index REAL" for f in FACES) + ")")
        have = {r[0] for r in c.execute("SELECT id FROM panoramas")}
        for i in range(ids):
            if i in have:
                continue
            sid = f"pano{i:05d}"
            for f in FACES:
                # A street-like scene: a horizon, blocks of different depth, noise.
                img = np.full((h, w, 3), 40, np.uint8)
                horizon = int(h * rng.uniform(0.3, 0.6))
                img[horizon:] = rng.integers(90, 140)
                for _ in range(rng.integers(2, 6)):
                    x0, x1 = sorted(rng.integers(0, w, 2))
                    y0 = int(rng.integers(0, horizon + 1))
                    img[y0:, x0:x1 + 1] = rng.integers(0, 255, 3)
                img = cv2.add(img, rng.integers(0, 20, img.shape, dtype=np.uint8))
                cv2.imwrite(os.path.join(workdir, "project", f"{sid}_{f}.jpg"), img)
            c.execute("INSERT INTO panoramas (id, panorama_sid) VALUES (?, ?)", (i, sid))
    return db


def unscored_faces(db: str):
    """The seed's load_tasks_from_db, resumable: only faces without a score yet. Reads the whole
    list up front (the seed notes that a long-lived cursor times out)."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT id, panorama_sid, " + ", ".join(f"{f}_depth_index" for f in FACES)
                         + " FROM panoramas ORDER BY id").fetchall()
    for row in rows:
        for f, score in zip(FACES, row[2:]):
            if score is None:
                yield {"id": row[0], "position": f, "panorama_sid": row[1]}


# ---- stages ---------------------------------------------------------------------------------------
def make_loader(workdir: str):
    def load(task):
        path = os.path.join(workdir, "project", f"{task['panorama_sid']}_{task['position']}.jpg")
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(path)
        return task, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return load


def collate(items):
    tasks = [t for t, _ in items]
    return tasks, np.stack([img for _, img in items])


def depth_model(device):
    """Factory: builds the depth model once per device replica; returns batch -> [(task, depth map), ...].

    PyTorch when installed (a small fixed-weight conv net standing in for the real model, on the GPU
    when `device` is one), else a NumPy stand-in (luminance, blurred, plus a vertical ramp)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        dev = torch.device(str(device)) if device.type == "cuda" else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 5, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 5, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 1, 3, padding=1), torch.nn.Sigmoid())
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        net = net.to(dev).eval()

        def infer(batch):
            tasks, images = batch
            with torch.inference_mode():
                x = torch.from_numpy(images).to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 255
                d = net(x)[:, 0]
                return list(zip(tasks, d.cpu().numpy()))  # one (task, depth) per input
        infer.backend = f"PyTorch on {dev}"
        return infer

    def infer_numpy(batch):
        tasks, images = batch
        lum = images.astype(np.float32).mean(axis=3) / 255.0
        ramp = np.linspace(0.0, 1.0, lum.shape[1], dtype=np.float32)[None, :, None]
        d = np.stack([cv2.GaussianBlur(m, (9, 9), 2.0) for m in lum]) * 0.5 + ramp * 0.5
        return list(zip(tasks, d))  # one (task, depth) per input
    infer_numpy.backend = "NumPy stand-in (PyTorch not installed)"
    return infer_numpy


def to_depth_image(depth: np.ndarray) -> np.ndarray:
    """The seed's depth_analysis2depth_image: depth map -> uint8 image."""
    d = depth.astype(np.float32)
    lo, hi = float(d.min()), float(d.max())
    return np.zeros(d.shape, np.uint8) if hi <= lo else ((d - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _seed_chain_fallback(depth_u8: np.ndarray) -> float:
    """FALLBACK (gpufleet.kernels.congestion_score is not available in this build): the seed's own
    chain with scikit-learn and OpenCV, 5 % sample k-means(4) as the seed does."""
    from sklearn.cluster import KMeans

    h, w = depth_u8.shape
    X = depth_u8.reshape(-1, 1).astype(np.float64)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(X), max(4, int(len(X) * 0.05)), replace=False)
    km = KMeans(n_clusters=4, n_init=10, random_state=0).fit(X[idx])
    labels = km.predict(X).reshape(h, w).astype(np.float32)
    span = labels.max() - labels.min()
    show = ((labels - labels.min()) * 255 / span if span > 0 else labels * 0).astype(np.uint8)
    edges = cv2.Canny(show, 100, 200)
    blurred = cv2.GaussianBlur(edges.astype(np.float32), (71, 71), 7, borderType=cv2.BORDER_REPLICATE)
    return float(np.mean(blurred))


USE_KERNELS = hasattr(gpufleet.kernels, "congestion_score")


def postprocess(item):
    task, depth = item
    img = to_depth_image(depth)
    if USE_KERNELS:
        score = gpufleet.kernels.congestion_score(img, k=4, canny_thresholds=(100, 200), ksize=71, sigma=7)
    else:
        score = _seed_chain_fallback(img)
    return {"id": task["id"], f"{task['position']}_depth_index": float(score)}


# ---- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=48, help="panoramas in the index (4 faces each)")
    ap.add_argument("--size", default="96x128", help="face size HxW")
    ap.add_argument("--workdir", default=None, help="where the index and images go (default: a temp dir)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="CPU postprocess threads")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    ap.add_argument("--plot", default=None, help="save throughput/queue-depth plot here")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must look like 96x128, got {args.size!r}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="gf-depth-")
    t = time.perf_counter()
    db = make_dataset(workdir, args.ids, (h, w))
    print(f"dataset: {args.ids} panoramas x {len(FACES)} faces of {h}x{w} in {workdir} "
          f"({time.perf_counter() - t:.1f} s)")
    print("postprocess: " + ("gpufleet.kernels.congestion_score" if USE_KERNELS else
                             "FALLBACK NumPy+OpenCV+scikit-learn seed chain (gpufleet.kernels.congestion_score "
                             "missing)"))
    backend = depth_model(gpufleet.Device("cpu")).backend if gpufleet.device_count() == 0 else "see devices"
    print(f"depth model: {backend}")

    sink = SqlSink(db, "panoramas", key="id", batch_rows=200, max_delay=0.5)
    pipeline = (gpufleet.Pipeline(unscored_faces(db), on_error="collect", progress=args.progress,
                                  id=lambda t: f"{t['panorama_sid']}_{t['position']}")
                .map(make_loader(workdir), workers=4, name="load")
                .batch(args.batch, max_delay=0.05, collate=collate, name="batch")
                .gpu(depth_model, name="depth")
                .unbatch(name="unbatch")
                .map(postprocess, workers=args.workers, name="congestion")
                .sink(sink, name="sql"))
    report = pipeline.run()
    print(report.summary())
    with sqlite3.connect(db) as c:
        scored = c.execute("SELECT count(*) FROM panoramas WHERE " +
                           " AND ".join(f"{f}_depth_index IS NOT NULL" for f in FACES)).fetchone()[0]
        mean = c.execute("SELECT avg(xm_depth_index) FROM panoramas").fetchone()[0]
    print(f"database: {scored}/{args.ids} panoramas fully scored, mean xm score {mean}")
    if args.trace:
        report.to_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    if args.plot:
        report.plot(args.plot)
        print(f"plot: {args.plot}")
    return 0 if not report.errors and scored == args.ids else 1


if __name__ == "__main__":
    sys.exit(main())
