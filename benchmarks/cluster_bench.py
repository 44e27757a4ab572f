"""Cluster benchmarks (issue 13): gpufleet on a Ray cluster against plain Ray, ratios from one run.

A real three-node Ray cluster on loopback (``ray.cluster_utils.Cluster``), each node a raylet of its
own with two ``num_gpus`` and its own simulated GPU topology (GPUFLEET_SIMULATED_GPUS in the raylet's
environment, as the tests do: tests/python/cluster_helpers.py), with different free memory per node.
Every task is a real process on its node.

1. throughput: N short commands (``true``), one per GPU at a time (6 GPUs), ``gpufleet.run(...,
   cluster=)`` against plain Ray tasks running the same subprocess, in the two forms a Ray user
   writes: ``@ray.remote(num_gpus=1)`` as is (GPU tasks default to ``max_calls=1``: a fresh worker
   process per task) and tuned with ``max_calls=0`` (workers reused). The default form runs a smaller
   N (``--default-n``: it starts a Python worker per task); every ratio is of throughputs. Best of
   ``--rounds`` interleaved rounds. gpufleet's figure is from the call to its return, which includes
   starting an agent on every node; a second line gives the run without that start-up (Ray's workers
   are warm after the first round).
2. makespan: 400 sleep tasks with skewed durations (8 x 1.2 s, 392 x 0.03 s, the long ones in the
   first half) on the 6 GPUs, against the lower bound max(total work / GPUs, longest task).
3. packing: tasks with mixed declared memory needs on GPUs with mixed free memory (node-a 2 x 8 GiB,
   node-b 2 x 16, node-c 2 x 24, all free): gpufleet's memory-aware admission against the fractional
   ``num_gpus`` a Ray user could set: uniform fractions (1, 1/2, 1/3, 1/4) and one in proportion to
   each task's need on the smallest GPU (need / 8 GiB: never over-commits, wastes the big GPUs).
   Reports makespan and out-of-memory events: a task that starts on a GPU where the declared needs of
   the tasks running there, its own included, exceed that GPU's free memory counts as one.

Ray binds to the machine's interface address; run it in a network namespace that holds only
loopback, as ``make test-ray`` does (as root)::

    PYTHONPATH=build/nocuda/stage unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' \\
        .venv/bin/python benchmarks/cluster_bench.py [--quick] [--only throughput|makespan|packing]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import time

import gpufleet

ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute in all)")
ap.add_argument("--only", choices=["throughput", "makespan", "packing"], default=None)
ap.add_argument("-n", type=int, default=None, help="commands in benchmark 1 (2000; --quick 300)")
ap.add_argument("--default-n", type=int, default=None,
                help="commands for plain Ray's default form in benchmark 1 (60; --quick 20)")
ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of benchmark 1 (2; --quick 1)")
args = ap.parse_args()
N = args.n or (300 if args.quick else 2000)
DEFAULT_N = args.default_n or (20 if args.quick else 60)
ROUNDS = args.rounds or (1 if args.quick else 2)

GiB = 1 << 30
# name -> memory of each of its 2 GPUs, all free. (A simulated GPU's free reading never changes, so a
# GPU half held by another process could not be simulated faithfully: real readings fall as tasks
# allocate, and admission counts on that: Note [Memory-aware admission].)
NODES = {"node-a": 8 * GiB, "node-b": 16 * GiB, "node-c": 24 * GiB}
GPUS_PER_NODE = 2
GPUS = GPUS_PER_NODE * len(NODES)


def _node_args(name: str) -> dict:
    topo = [{"name": f"Simulated {name} GPU", "total_memory": NODES[name],
             "uuid": f"GPU-{i:08x}-0000-4000-8000-{sum(map(ord, name)):012x}"} for i in range(GPUS_PER_NODE)]
    return {"num_cpus": 1, "num_gpus": GPUS_PER_NODE, "object_store_memory": 80 << 20,
            "env_vars": {"GPUFLEET_NODE_NAME": name, "GPUFLEET_SIMULATED_GPUS": json.dumps(topo),
                         "PYTHONPATH": os.environ.get("PYTHONPATH", "")}}


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=True, head_node_args=_node_args("node-a"))
    for name in ("node-b", "node-c"):
        c.add_node(**_node_args(name))
    c.wait_for_nodes()
    end = time.monotonic() + 60
    while ray.available_resources().get("GPU", 0) < GPUS and time.monotonic() < end:
        time.sleep(0.1)
    return ray, c


def wait_gpus_free(ray) -> None:
    """The GPUs back in Ray's pool (a finished gpufleet run's agents release theirs asynchronously)."""
    end = time.monotonic() + 60
    while ray.available_resources().get("GPU", 0) < GPUS - 1e-6 and time.monotonic() < end:
        time.sleep(0.05)


def _sh(argv: list) -> dict:
    """Plain Ray's task body: the command as a subprocess, and where and when it ran."""
    import ray

    t0 = time.time()
    subprocess.run(argv, check=True)
    return {"node": os.environ.get("GPUFLEET_NODE_NAME"), "gpu": ray.get_gpu_ids()[0], "start": t0,
            "end": time.time()}


def plain_ray(ray, argvs: list, num_gpus, max_calls=None) -> tuple[float, list]:
    """Plain Ray tasks, one per command: (wall time, where each ran). ``num_gpus`` may be a list (one
    per task). Without ``max_calls`` the task is declared as a Ray user writes it,
    ``@ray.remote(num_gpus=...)``: Ray then gives GPU tasks ``max_calls=1`` (it decides that default
    from the decorator's ``num_gpus``; ``.options(num_gpus=...)`` alone would not)."""
    # num_cpus=0: the nodes' one CPU each must not cap GPU tasks (a Ray user's GPU box has CPUs)
    if max_calls is None:
        fn = ray.remote(num_gpus=num_gpus, num_cpus=0)(_sh)
        refs = lambda: [fn.remote(a) for a in argvs]  # noqa: E731
    else:
        fn = ray.remote(num_gpus=1, num_cpus=0, max_calls=max_calls)(_sh)
        gpus = num_gpus if isinstance(num_gpus, list) else [num_gpus] * len(argvs)
        refs = lambda: [fn.options(num_gpus=g).remote(a) for a, g in zip(argvs, gpus)]  # noqa: E731
    wait_gpus_free(ray)
    t0 = time.perf_counter()
    got = ray.get(refs())
    return time.perf_counter() - t0, got


def ours(address: str, tasks: list, slots: int = 1):
    import ray

    wait_gpus_free(ray)
    t0 = time.perf_counter()
    report = gpufleet.run(tasks, cluster=address, slots_per_device=slots, quiet=True, output="null")
    wall = time.perf_counter() - t0
    assert report.ok, report.summary()
    return wall, report


def throughput(ray, address: str) -> None:
    cmds = [["true"]] * N
    times: dict = {"gpufleet.run(cluster=)": [], "  the same, agents started": [], "Ray, max_calls=0 (tuned)": [],
                   "Ray, default max_calls": []}
    for _ in range(ROUNDS):  # interleaved: the machine is shared and noisy
        wall, report = ours(address, [gpufleet.Task(c) for c in cmds])
        times["gpufleet.run(cluster=)"].append(N / wall)
        # the run itself, without starting and ending the agents (Ray's own workers are warm after a round)
        times["  the same, agents started"].append(N / report.wall_time)
        times["Ray, max_calls=0 (tuned)"].append(N / plain_ray(ray, cmds, 1, max_calls=0)[0])
        times["Ray, default max_calls"].append(DEFAULT_N / plain_ray(ray, cmds[:DEFAULT_N], 1)[0])
    best = {k: max(v) for k, v in times.items()}
    mine = best["gpufleet.run(cluster=)"]
    print(f"\n1. {N} `true` commands, one per GPU at a time ({GPUS} GPUs on 3 nodes); best of {ROUNDS} interleaved "
          f"rounds (Ray's default form: {DEFAULT_N} commands)")
    print(f"   {'runner':28s} {'tasks/s':>9s} {'gpufleet / it':>14s}")
    for name, tp in best.items():
        print(f"   {name:28s} {tp:9.1f} {mine / tp:13.2f}x")


def skewed(rng: random.Random) -> list:
    longs, shorts = [1.2] * 8, [0.03] * 392
    order = shorts[:]
    for d in longs:
        order.insert(rng.randrange(0, len(order) // 2), d)
    return order


def makespan(ray, address: str) -> None:
    order = skewed(random.Random(13))
    bound = max(sum(order) / GPUS, max(order))
    wall, report = ours(address, [gpufleet.Task(["sleep", f"{d}"], name=str(i)) for i, d in enumerate(order)])
    ray_wall, _ = plain_ray(ray, [["sleep", f"{d}"] for d in order], 1, max_calls=0)
    print(f"\n2. 400 tasks, 8 x 1.2 s + 392 x 0.03 s, on {GPUS} GPUs x 1 slot (3 nodes)")
    print(f"   lower bound max(work/GPUs, longest) = {bound:.2f} s")
    print(f"   gpufleet.run(cluster=) makespan {report.wall_time:.2f} s = {report.wall_time / bound:.3f}x the bound "
          f"(call to return: {wall:.2f} s)")
    print(f"   plain Ray tasks (max_calls=0) {ray_wall:.2f} s = {ray_wall / bound:.3f}x the bound")
    # Where the excess goes: the GPUs' idle time between gpufleet's tasks (its scheduling: round trips,
    # launches) against the time the tasks took beyond their nominal sleeps (fork, exec and exit of
    # `sleep` on these cores, which the bound does not count).
    by_gpu: dict = {}
    for a in report.attempts:
        by_gpu.setdefault(a.devices[0], []).append((a.start, a.end))
    idle = [sum(b[0] - a[1] for a, b in zip(xs, xs[1:])) for xs in map(sorted, by_gpu.values())]
    last = max(a.end for a in report.attempts)
    tail = [last - max(e for _, e in xs) for xs in by_gpu.values()]  # done while a long task still runs
    extra = sum(a.end - a.start for a in report.attempts) - sum(order)
    print(f"   per GPU: idle between tasks {min(idle):.3f}-{max(idle):.3f} s, idle at the end {min(tail):.2f}-"
          f"{max(tail):.2f} s; the tasks ran {extra / GPUS:.2f} s per GPU beyond their nominal durations "
          f"({1e3 * extra / len(order):.1f} ms a task)")


def oom_events(runs: list) -> int:
    """runs: (node, gpu, start, end, need). A start at which the needs on its GPU exceed the GPU's free memory."""
    by_gpu: dict = {}
    for r in runs:
        by_gpu.setdefault((r[0], r[1]), []).append(r)
    events = 0
    for (node, _), rs in by_gpu.items():
        free = NODES[node]
        for r in rs:
            here = sum(o[4] for o in rs if o[2] <= r[2] < o[3])
            events += here > free
    return events


def packing(ray, address: str) -> None:
    rng = random.Random(3)
    n, secs = (60, 0.4) if args.quick else (150, 0.6)
    needs = [rng.choice([1, 2, 3, 4, 6]) * GiB for _ in range(n)]
    bound = sum(needs) * secs / (sum(NODES.values()) * GPUS_PER_NODE)  # memory-seconds bound
    wall, report = ours(address, [gpufleet.Task(["sleep", f"{secs}"], min_free_memory=need, name=str(i))
                                  for i, need in enumerate(needs)], slots=8)
    mine = []
    for a in report.attempts:
        node, _, dev = a.devices[0].partition("/")
        mine.append((node, dev, a.start, a.end, needs[a.seq]))
    rows = [("gpufleet.run(cluster=), min_free_memory=need", wall, oom_events(mine))]
    for label, gpus in (("Ray num_gpus=1", 1), ("Ray num_gpus=1/2", 0.5), ("Ray num_gpus=1/3", 1 / 3),
                        ("Ray num_gpus=1/4", 0.25), ("Ray num_gpus=need/8GiB (per task)", [nd / (8 * GiB) for nd in needs])):
        t, got = plain_ray(ray, [["sleep", f"{secs}"]] * n, gpus, max_calls=0)
        runs = [(g["node"], g["gpu"], g["start"], g["end"], nd) for g, nd in zip(got, needs)]
        rows.append((label, t, oom_events(runs)))
    print(f"\n3. {n} tasks of {secs} s needing 1-6 GiB each, on GPUs with 8/8/16/16/24/24 GiB free "
          f"(bound by memory-seconds: {bound:.2f} s)")
    print(f"   {'placement':46s} {'makespan':>9s} {'OOM events':>11s} {'vs gpufleet':>12s}")
    for label, t, oom in rows:
        print(f"   {label:46s} {t:8.2f}s {oom:11d} {t / rows[0][1]:11.2f}x")


if __name__ == "__main__":
    ray, cluster = start_cluster()
    try:
        for name, fn in (("throughput", throughput), ("makespan", makespan), ("packing", packing)):
            if args.only in (None, name):
                fn(ray, cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
