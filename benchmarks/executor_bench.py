"""GPUExecutor against its baselines, every figure a ratio measured in the same run, interleaved (the
machine is shared and noisy):

- a large float64 array sent to a worker and back (``submit(ident, a).result()``), 32 and 128 MB,
  against the copy floor (two ``np.copyto`` of the same size in this process: what one copy each
  way costs) and ``ProcessPoolExecutor``. Targets: within 2x the floor, >= 4x ProcessPoolExecutor.
- ``map`` over 10,000 tiny items at chunksize 1 against ``multiprocessing.Pool.map`` (same chunk
  size) and ``ProcessPoolExecutor.map``. Targets: >= 1.0x Pool, >= 3x ProcessPoolExecutor.
- a trivial ``submit().result()`` round trip (no target; for the record).

Same worker count everywhere (simulated GPUs for GPUExecutor, the spawn start method for the
baselines); pools are warmed up before anything is timed.

    PYTHONPATH=<build>/stage .venv/bin/python benchmarks/executor_bench.py [--workers 2] [--rounds 7] [--quick]
"""
import argparse
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import gpufleet


def ident(x):
    return x


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def arrays(g, p, sizes_mb, rounds):
    """Median seconds per size for: the copy floor, GPUExecutor, ProcessPoolExecutor (interleaved)."""
    rows = []
    for mb in sizes_mb:
        a = np.random.default_rng(mb).standard_normal(mb * 2**20 // 8)
        dst = np.empty_like(a)
        np.copyto(dst, a)  # both pages touched before timing
        t = {"floor": [], "gpufleet": [], "ppe": []}
        for r in range(rounds + 1):  # the first round warms up (segments made, pages faulted): dropped
            for name in ("floor", "gpufleet", "ppe"):
                if name == "floor":
                    dt, _ = _timed(lambda: (np.copyto(dst, a), np.copyto(dst, a)))
                else:
                    ex = g if name == "gpufleet" else p
                    dt, back = _timed(lambda: ex.submit(ident, a).result())
                    assert back.shape == a.shape and back[-1] == a[-1] and back[0] == a[0]
                    del back
                if r:
                    t[name].append(dt)
                time.sleep(0.1)  # let the processes just used free what they freed before the next one is timed
        rows.append((mb, {k: statistics.median(v) for k, v in t.items()}))
    return rows


def tiny_maps(g, p, pool, n, rounds):
    items = list(range(n))
    t = {"gpufleet": [], "pool": [], "ppe": []}
    runs = {"gpufleet": lambda: list(g.map(ident, items, chunksize=1)),
            "pool": lambda: pool.map(ident, items, chunksize=1),
            "ppe": lambda: list(p.map(ident, items, chunksize=1))}
    for r in range(rounds + 1):
        for name, run in runs.items():
            dt, out = _timed(run)
            assert out == items
            if r:
                t[name].append(n / dt)
    return {k: statistics.median(v) for k, v in t.items()}


def round_trips(g, p, pool, n):
    t = {"gpufleet": [], "ppe": [], "pool": []}
    calls = {"gpufleet": lambda i: g.submit(ident, i).result(), "ppe": lambda i: p.submit(ident, i).result(),
             "pool": lambda i: pool.apply_async(ident, (i,)).get()}
    for i in range(n):
        for name, call in calls.items():
            t[name].append(_timed(lambda: call(i))[0])
    return {k: statistics.median(v) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per figure (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="32 MB only, 2,000 items, 2 rounds")
    a = ap.parse_args()
    w, rounds = a.workers, (2 if a.quick else a.rounds)
    n_items = 2000 if a.quick else 10_000
    sizes = (32,) if a.quick else (32, 128)
    gpufleet.simulate_gpus(w)
    ctx = mp.get_context("spawn")
    with gpufleet.GPUExecutor() as g, ProcessPoolExecutor(w, mp_context=ctx) as p, ctx.Pool(w) as pool:
        for _ in range(50):  # every worker started and warm
            g.submit(ident, 0).result(), p.submit(ident, 0).result(), pool.apply_async(ident, (0,)).get()
        rt = round_trips(g, p, pool, 300 if a.quick else 1000)
        maps = tiny_maps(g, p, pool, n_items, rounds)
        big = arrays(g, p, sizes, rounds)
    print(f"{w} workers, {rounds} timed rounds per figure (medians), interleaved")
    print(f"map over {n_items:,} tiny items, chunksize 1 (items/s):")
    print(f"  GPUExecutor {maps['gpufleet']:10,.0f}   multiprocessing.Pool {maps['pool']:10,.0f}   "
          f"ProcessPoolExecutor {maps['ppe']:10,.0f}")
    print(f"  ratio vs Pool {maps['gpufleet'] / maps['pool']:.2f}x (target >= 1.0)   "
          f"vs ProcessPoolExecutor {maps['gpufleet'] / maps['ppe']:.2f}x (target >= 3)")
    print("float64 array to a worker and back (ms):")
    for mb, m in big:
        print(f"  {mb:4d} MB  copy floor {m['floor'] * 1e3:7.1f}  GPUExecutor {m['gpufleet'] * 1e3:7.1f}  "
              f"ProcessPoolExecutor {m['ppe'] * 1e3:8.1f}   GPUExecutor/floor {m['gpufleet'] / m['floor']:.2f}x "
              f"(target <= 2)   ProcessPoolExecutor/GPUExecutor {m['ppe'] / m['gpufleet']:.2f}x (target >= 4)")
    print(f"submit(f).result() round trip, trivial f (us): GPUExecutor {rt['gpufleet'] * 1e6:.0f}   "
          f"ProcessPoolExecutor {rt['ppe'] * 1e6:.0f}   Pool.apply_async {rt['pool'] * 1e6:.0f}")


if __name__ == "__main__":
    main()
