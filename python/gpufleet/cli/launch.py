"""`gpufleet launch [--nproc-per-node N|gpu] [--nnodes N --node-rank R --master-addr A --master-port P]
[--max-restarts K] script.py args...`: torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT) plus
CUDA_VISIBLE_DEVICES per local rank, so training scripts run unchanged. On the first failure the
other ranks are stopped (SIGTERM, grace, SIGKILL) and the whole group restarts, up to K times. Each
rank writes its own log file; the root-cause failure (the first rank that failed) is printed first."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .. import _core, _devices
from .._dispatch import _resolve_devices
from .._executor import free_port
from .._spawn import Supervised, describe_exit, stop_group


def register(sub) -> None:
    p = sub.add_parser("launch", help="start one process per GPU with torchrun's environment",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="gpu",
                   help="processes on this node: a number, or 'gpu' (one per visible GPU; default)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", "--node_rank", type=int, default=0)
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="default: a free port (single node) or 29500 (several nodes)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0)
    p.add_argument("--devices", default="auto", help="GPUs to use ('auto' or '0,2')")
    p.add_argument("--log-dir", default=None, help="per-rank logs (default: ./gpufleet-launch-logs/<run>)")
    p.add_argument("--kill-grace", type=float, default=5.0)
    p.add_argument("--no-python", action="store_true", help="the script is an executable, not a Python file")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=main)


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def main(args) -> int:
    ordinals = _resolve_devices(args.devices)
    pool = _core.make_pool(ordinals)
    if args.nproc_per_node == "gpu":
        nproc = len(pool)
        if nproc == 0:
            print("gpufleet launch: --nproc-per-node gpu but no GPU is visible; give a number", file=sys.stderr)
            return 2
    else:
        try:
            nproc = int(args.nproc_per_node)
        except ValueError:
            print(f"gpufleet launch: --nproc-per-node must be a number or 'gpu', got {args.nproc_per_node!r}",
                  file=sys.stderr)
            return 2
        if nproc < 1:
            print(f"gpufleet launch: --nproc-per-node must be >= 1, got {nproc}", file=sys.stderr)
            return 2
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        print(f"gpufleet launch: --node-rank {args.node_rank} is outside 0..{args.nnodes - 1}", file=sys.stderr)
        return 2
    port = args.master_port or (free_port(args.master_addr) if args.nnodes == 1 else 29500)
    run_id = _core.random_token()[:8]
    log_dir = args.log_dir or os.path.join("gpufleet-launch-logs", run_id)
    os.makedirs(log_dir, exist_ok=True)
    world = nproc * args.nnodes
    cmd = ([args.script] if args.no_python else [sys.executable, "-u", args.script]) + list(args.script_args)
    sup = Supervised(args.kill_grace)
    try:
        for restart in range(args.max_restarts + 1):
            procs, logs = [], []
            for local in range(nproc):
                rank = args.node_rank * nproc + local
                env = {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(args.node_rank),
                       "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(port),
                       "TORCHELASTIC_RESTART_COUNT": str(restart), "GPUFLEET_WORKER": str(rank)}
                if pool:
                    d = pool[local % len(pool)]
                    env["CUDA_VISIBLE_DEVICES"] = d.visible_id
                    env["GPUFLEET_DEVICE"] = f"cuda:{d.ordinal}"
                else:
                    env["CUDA_VISIBLE_DEVICES"] = ""
                log = os.path.join(log_dir, f"attempt{restart}-rank{rank}.log")
                logs.append(log)
                with open(log, "wb") as f:
                    procs.append(sup.popen(cmd, env, stdout=f, stderr=f, stdin=__import__("subprocess").DEVNULL))
            print(f"gpufleet launch: {nproc} rank{'s' if nproc != 1 else ''} started (attempt {restart + 1}/"
                  f"{args.max_restarts + 1}, MASTER_PORT={port}, logs in {log_dir})", file=sys.stderr, flush=True)
            failed = None
            try:
                while failed is None and any(p.poll() is None for p in procs):
                    for i, p in enumerate(procs):
                        if p.poll() not in (None, 0):
                            failed = i
                            break
                    time.sleep(0.02)
                if failed is None:
                    failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
            except KeyboardInterrupt:
                print("gpufleet launch: interrupted: stopping every rank", file=sys.stderr)
                stop_group(procs, args.kill_grace)
                return 130
            if failed is None:
                print(f"gpufleet launch: all {nproc} ranks finished", file=sys.stderr)
                return 0
            code = procs[failed].returncode
            stop_group(procs, args.kill_grace)
            for p in procs:
                sup.forget(p)
            rank = args.node_rank * nproc + failed
            print(f"gpufleet launch: ROOT CAUSE: rank {rank} (local {failed}) failed first with {describe_exit(code)}; "
                  f"its log {logs[failed]} ends with:\n{_tail(logs[failed])}", file=sys.stderr)
            others = [f"rank {args.node_rank * nproc + i}: {describe_exit(p.returncode)}" for i, p in enumerate(procs)
                      if i != failed]
            if others:
                print("gpufleet launch: then stopped: " + ", ".join(others), file=sys.stderr)
            if restart < args.max_restarts:
                print(f"gpufleet launch: restarting the group ({restart + 1}/{args.max_restarts})", file=sys.stderr)
        return 1
    finally:
        sup.close()
