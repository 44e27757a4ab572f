"""GPUExecutor against concurrent.futures.ProcessPoolExecutor and multiprocessing.Pool (same worker
count, spawn start method, measured in one run): round-trip latency of submit() for a trivial
function, and map() throughput over 10,000 small items. Startup is excluded (pools warmed up).

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
