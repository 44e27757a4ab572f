"""The queue against task-spooler (Debian's `task-spooler`, binary `tsp`): N trivial jobs (`true`)
submitted by 4 concurrent submitter processes, each job run on one of 4 slots (gpufleet: 4 simulated
GPUs x 1 slot; ts: `tsp -S 4`). For each system and run: the latency of every submit call as the
submitter sees it (median, p99) and the throughput, N / (first submit -> last job ended). Runs are
interleaved (ts, gpufleet, ts, gpufleet, ...), each on a fresh queue.

Modes: `api` submits with gpufleet.submit() (one connection per submitter process: how a script
queues jobs), `cli` starts `gpufleet submit -- true` once per job, as `tsp true` is (a Python process
per job: its start-up, not the queue, sets that figure), `batch` gives each submitter's jobs to one
`gpufleet submit -- true ::: 1 2 ...` (a job per input over one connection; its submit latency is that
call's time divided by its jobs). ts has only its command line, one `tsp true` per job.

    PYTHONPATH=<build>/stage .venv/bin/python benchmarks/queue_bench.py [--jobs 10000] [--runs 3]
        [--modes api,cli,batch] [--cli-jobs 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

SUBMITTERS = 4
SLOTS = 4

_SUBMITTER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    mode, n, start = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    gf = [sys.executable, "-c", "import sys; from gpufleet.cli import main; sys.exit(main())"]  # the script
    if mode == "batch":
        while not os.path.exists(start):
            time.sleep(0.0005)
        t_first = time.time()
        t0 = time.perf_counter()
        out = subprocess.run(gf + ["submit", "--", "true", ":::", *map(str, range(n))], stdout=subprocess.PIPE,
                             check=True).stdout.split()
        assert len(out) == n, (len(out), n)
        print(json.dumps({"first": t_first, "lat": [(time.perf_counter() - t0) / n] * n, "last": int(out[-1])}))
        sys.exit(0)
    if mode == "api":
        import gpufleet.queue as q
        submit = lambda: q.submit(["true"]).id
    else:
        argv = ["tsp", "true"] if mode == "ts" else gf + ["submit", "--", "true"]
        submit = lambda: int(subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout)
    while not os.path.exists(start):
        time.sleep(0.0005)
    lat = []
    t_first = time.time()
    for _ in range(n):
        t0 = time.perf_counter()
        last = submit()
        lat.append(time.perf_counter() - t0)
    print(json.dumps({"first": t_first, "lat": lat, "last": last}))
""")


def _submitters(mode: str, n: int, env: dict, workdir: str) -> tuple:
    start = os.path.join(workdir, "go")
    per = [n // SUBMITTERS + (1 if i < n % SUBMITTERS else 0) for i in range(SUBMITTERS)]
    procs = [subprocess.Popen([sys.executable, "-c", _SUBMITTER, mode, str(k), start], env=env, cwd=workdir,
                              stdout=subprocess.PIPE, text=True) for k in per]
    time.sleep(0.5)  # every submitter is up and waiting
    open(start, "w").close()
    firsts, lat, lasts = [], [], []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a {mode} submitter failed ({p.returncode})")
        r = json.loads(out)
        firsts.append(r["first"])
        lat += r["lat"]
        lasts.append(r["last"])
    os.unlink(start)
    return min(firsts), lat, lasts


def run_gpufleet(mode: str, n: int, base_env: dict) -> dict:
    d = tempfile.mkdtemp(prefix="gfqb-", dir="/tmp")
    env = {**base_env, "GPUFLEET_QUEUE_DIR": d, "GPUFLEET_SIMULATED_GPUS": str(SLOTS)}
    gf = [sys.executable, "-m", "gpufleet"]
    try:
        subprocess.run(gf + ["queue", "start", "--slots", "1"], env=env, check=True, stdout=subprocess.DEVNULL)
        first, lat, _ = _submitters(mode, n, env, d)
        r = subprocess.run(gf + ["ls", "--json"], env=env, check=True, capture_output=True, text=True)
        ids = [j["id"] for j in json.loads(r.stdout)["jobs"]]
        w = subprocess.run(gf + ["wait", *map(str, ids)], env=env, capture_output=True, text=True)  # blocks
        r = subprocess.run(gf + ["ls", "--json"], env=env, check=True, capture_output=True, text=True)
        jobs = json.loads(r.stdout)["jobs"]
        if w.returncode != 0 or len(jobs) != n or any(j["state"] != "succeeded" for j in jobs):
            raise RuntimeError(f"gpufleet: {len(jobs)} jobs, wait exit {w.returncode}")
        last = max(j["ended"] for j in jobs)
    finally:
        subprocess.run(gf + ["queue", "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)
    return {"system": f"gpufleet-{mode}", "jobs": n, "wall": last - first, "lat": lat}


def run_ts(n: int, base_env: dict) -> dict:
    d = tempfile.mkdtemp(prefix="tsb-", dir="/tmp")
    env = {**base_env, "TS_SOCKET": os.path.join(d, "ts.sock"), "TMPDIR": d, "TS_MAXFINISHED": str(n + 10)}
    try:
        subprocess.run(["tsp", "-S", str(SLOTS)], env=env, check=True)
        first, lat, lasts = _submitters("ts", n, env, d)
        # ts keeps no end time per job and has no "wait for all": -w (blocking, no load on its server) on
        # each submitter's last job, the last to start; then its list, polled if anything still runs.
        for jid in lasts:
            subprocess.run(["tsp", "-w", str(jid)], env=env, stdout=subprocess.DEVNULL)
        while True:
            out = subprocess.run(["tsp", "-l"], env=env, check=True, capture_output=True, text=True).stdout
            states = [ln.split()[1] for ln in out.splitlines()[1:] if ln.strip()]
            if len(states) == n and all(s == "finished" for s in states):
                break
            time.sleep(0.02)
        last = time.time()
        bad = [ln for ln in out.splitlines()[1:] if ln.split()[3] != "0"]
        if bad:
            raise RuntimeError(f"ts: {len(bad)} jobs did not exit 0")
    finally:
        subprocess.run(["tsp", "-K"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)
    return {"system": "ts", "jobs": n, "wall": last - first, "lat": lat}


def summary(r: dict) -> dict:
    lat = sorted(r["lat"])
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return {"system": r["system"], "jobs": r["jobs"], "median_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * p99, "jobs_per_s": r["jobs"] / r["wall"], "wall_s": r["wall"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--cli-jobs", type=int, default=2_000, help="jobs of the cli mode (a Python start per job)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="api,cli")
    args = ap.parse_args()
    if shutil.which("tsp") is None:
        print("queue_bench: needs task-spooler's tsp (Debian: apt-get install task-spooler)", file=sys.stderr)
        return 2
    import gpufleet

    env = dict(os.environ)  # the submitters run elsewhere: the same gpufleet by an absolute path
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(gpufleet.__file__)))] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    modes = [m for m in args.modes.split(",") if m]
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()[0]:.1f}, {SUBMITTERS} submitters, "
          f"{SLOTS} slots", flush=True)
    rows = []
    for run in range(args.runs):
        for mode in modes:
            n = args.cli_jobs if mode == "cli" else args.jobs
            pair = [summary(run_ts(n, env)), summary(run_gpufleet(mode, n, env))]
            pair[1]["ratio"] = pair[1]["jobs_per_s"] / pair[0]["jobs_per_s"]
            for s in pair:
                print(json.dumps({"run": run + 1, **{k: round(v, 3) if isinstance(v, float) else v
                                                     for k, v in s.items()}}), flush=True)
            rows.append(pair)
    print("\nsystem            jobs   submit median   submit p99   throughput (range over runs)   vs ts")
    for mode in modes:
        pairs = [p for p in rows if p[1]["system"] == f"gpufleet-{mode}"]
        for k, name in ((0, "ts"), (1, f"gpufleet-{mode}")):
            xs = [p[k] for p in pairs]
            rng = lambda key: f"{min(x[key] for x in xs):.1f}-{max(x[key] for x in xs):.1f}"  # noqa: E731
            ratios = [p[1]["ratio"] for p in pairs]
            ratio = "" if k == 0 else f"{min(ratios):.2f}-{max(ratios):.2f}x"
            print(f"{name:<17} {xs[0]['jobs']:>5}   {rng('median_ms'):>10} ms   {rng('p99_ms'):>9} ms   "
                  f"{rng('jobs_per_s'):>15} jobs/s   {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
