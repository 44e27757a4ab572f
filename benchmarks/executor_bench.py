"""GPUExecutor against concurrent.futures.ProcessPoolExecutor and multiprocessing.Pool (same worker
count, spawn start method, measured in one run): round-trip latency of submit() for a trivial
function, map() throughput over 10,000 small items, and the round trip of a large NumPy array (sent
to a worker and returned, 4, 32 and 128 MB). Startup is excluded (pools warmed up).

    PYTHONPATH=<build>/stage .venv/bin/python benchmarks/executor_bench.py [--quick]
"""
import argparse
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import gpufleet


def ident(x):
    return x


def bench(name, submit_one, map_all, n_rt, items):
    for _ in range(20):
        submit_one(0)  # warm-up: every worker started
    rts = []
    for i in range(n_rt):
        t0 = time.perf_counter()
        submit_one(i)
        rts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = map_all(items)
    dt = time.perf_counter() - t0
    assert out == items
    return name, statistics.median(rts) * 1e6, len(items) / dt


def array_round_trips(w, ctx, sizes_mb, reps):
    """Median seconds to send an array to a worker and get it back, per executor and size."""
    import numpy as np

    rows = []
    for mb in sizes_mb:
        a = np.random.default_rng(0).standard_normal(mb * 2**20 // 8)
        with gpufleet.GPUExecutor() as g, ProcessPoolExecutor(w, mp_context=ctx) as p:
            times = {"gpufleet": [], "ppe": []}
            for _ in range(reps):  # interleaved, so load changes hit both sides
                for name, ex in (("gpufleet", g), ("ppe", p)):
                    t0 = time.perf_counter()
                    back = ex.submit(ident, a).result()
                    times[name].append(time.perf_counter() - t0)
                    assert back.shape == a.shape and back[-1] == a[-1]
        rows.append((mb, statistics.median(times["gpufleet"][1:]), statistics.median(times["ppe"][1:])))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    n_items = 2000 if a.quick else 10_000
    n_rt = 200 if a.quick else 1000
    items = list(range(n_items))
    w = a.workers
    gpufleet.simulate_gpus(w)
    rows = []
    cs = max(1, n_items // (4 * w))  # multiprocessing.Pool.map's default chunk size
    ctx = mp.get_context("spawn")
    for chunk in (1, cs):
        with gpufleet.GPUExecutor() as ex:
            rows.append(bench(f"gpufleet.GPUExecutor c={chunk}", lambda i: ex.submit(ident, i).result(),
                              lambda xs: list(ex.map(ident, xs, chunksize=chunk)), n_rt, items))
        with ProcessPoolExecutor(w, mp_context=ctx) as ex:
            rows.append(bench(f"ProcessPoolExecutor c={chunk}", lambda i: ex.submit(ident, i).result(),
                              lambda xs: list(ex.map(ident, xs, chunksize=chunk)), n_rt, items))
        with ctx.Pool(w) as pool:
            rows.append(bench(f"multiprocessing.Pool c={chunk}", lambda i: pool.apply_async(ident, (i,)).get(),
                              lambda xs: pool.map(ident, xs, chunksize=chunk), n_rt, items))
    print(f"{w} workers; submit round trip (median of {n_rt}) and map over {n_items:,} items (c = chunksize)")
    print(f"  {'executor':32s} {'round trip':>12s} {'theirs/ours':>12s} {'map items/s':>12s} {'ours/theirs':>12s}")
    for k, (name, rt, tp) in enumerate(rows):
        ours = rows[0 if k < 3 else 3]
        print(f"  {name:32s} {rt:10.0f} us {rt / ours[1]:11.2f}x {tp:12.0f} {ours[2] / tp:11.2f}x")
    reps = 4 if a.quick else 9
    print(f"float64 array to a worker and back (submit(ident, a).result(), median of {reps - 1}; "
          "GPUExecutor: shared memory, Note [Out-of-band buffers])")
    print(f"  {'size':>8s} {'GPUExecutor':>12s} {'ProcessPoolExecutor':>20s} {'ratio':>7s}")
    for mb, ours, theirs in array_round_trips(w, ctx, (4, 32) if a.quick else (4, 32, 128), reps):
        print(f"  {mb:5d} MB {ours * 1e3:9.1f} ms {theirs * 1e3:17.1f} ms {theirs / ours:6.2f}x")
