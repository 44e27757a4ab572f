"""`gpufleet launch [--nproc-per-node N|gpu] [--nnodes N --node-rank R --master-addr A --master-port P]
[--max-restarts K] [--tee S] [--redirects S] script.py args...`: torchrun's environment (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT) plus CUDA_VISIBLE_DEVICES per local rank, so training scripts run
unchanged. On the first failure the other ranks are stopped (SIGTERM, grace, SIGKILL) and the whole
group restarts, up to K times; the root-cause failure (the first rank that failed) is printed first.

Output (Note [Launch output as torchrun]): by default every rank's stdout and stderr go to the
console with torchrun's prefix, "[rank0]:" (torchrun's "[<role><local rank>]:", role from --role),
and to <log-dir>/attempt_<k>/<local rank>/stdout.log and stderr.log. --redirects S and --tee S take
torchrun's values: 0 none, 1 stdout, 2 stderr, 3 both, or per local rank "0:3,1:1"; once either is
given, redirected streams go to the files only, tee'd streams to the files and (prefixed) to the
console, and the others straight to the console, as torchrun does."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from typing import Optional

from .. import _core
from .._dispatch import _resolve_devices
from .._executor import free_port
from .._spawn import Supervised, describe_exit, stop_group

# Note [Launch output as torchrun]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torchrun (torch.distributed.elastic) decides per local rank and per stream: a stream in
# --redirects or --tee is written to <attempt dir>/<local rank>/{stdout,stderr}.log; a stream in
# --tee is also copied to the launcher's own stdout/stderr, each line prefixed "[<role><local
# rank>]:" (TailLog's header; role "default" unless --role); any other stream is inherited, so it
# reaches the console unprefixed. --local-ranks-filter keeps the other ranks off the console (their
# files are still written). gpufleet does the same with a pipe and a thread per copied stream instead
# of tailing the files, so lines arrive as they are written; a last line without a newline gets one.
# The differences: with neither flag gpufleet behaves as "--tee 3" (prefixed console and files; the
# root-cause report reads the file), and the role defaults to "rank", so the prefix is "[rank0]:".

_STD_VALUE = re.compile(r"[0-3]")
_STD_MAP = re.compile(r"(\d+:[0-3],)*\d+:[0-3]")
OUT, ERR = 1, 2


def parse_std(value: str, nproc: int, name: str) -> list[int]:
    """torchrun's ``Std.from_str`` and ``to_map``: one value for every local rank, or a per-rank map
    (ranks it does not name get 0)."""
    v = value.strip()
    if _STD_VALUE.fullmatch(v):
        return [int(v)] * nproc
    if _STD_MAP.fullmatch(v):
        out = [0] * nproc
        for item in v.split(","):
            rank, std = item.split(":")
            if int(rank) >= nproc:
                raise ValueError(f"{name} {value!r} names local rank {rank}, but there are {nproc} local ranks "
                                 f"(0..{nproc - 1})")
            out[int(rank)] = int(std)
        return out
    raise ValueError(f"{name} {value!r} is not understood: give 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per "
                     "local rank as '0:3,1:1'")


def register(sub) -> None:
    p = sub.add_parser("launch", help="start one process per GPU with torchrun's environment",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="gpu",
                   help="processes on this node: a number, or 'gpu' (one per visible GPU; default)")
    p.add_argument("--nnodes", type=int, default=None, help="nodes of the job (default 1; with --cluster, every "
                   "node with --nproc-per-node GPUs)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="place the ranks on a Ray cluster ('auto', 'ray://head:10001', 'head:6379'; needs gpufleet[ray]): "
                        "Ray picks the nodes, MASTER_ADDR/MASTER_PORT are rank 0's; the script and --log-dir must be "
                        "on a file system every node shares")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="with --cluster: pass this variable of the launcher's environment to every rank (ranks "
                        "otherwise see their own node's environment, as GNU parallel's --env; repeatable)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=0)
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="default: a free port (single node) or 29500 (several nodes)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0)
    p.add_argument("--devices", default="auto", help="GPUs to use ('auto' or '0,2')")
    p.add_argument("--log-dir", "--log_dir", default=None,
                   help="per-rank logs, <log-dir>/attempt_<k>/<local rank>/{stdout,stderr}.log "
                        "(default: ./gpufleet-launch-logs/<run>)")
    p.add_argument("-r", "--redirects", default=None, metavar="S",
                   help="streams to the log files only: 0 none, 1 stdout, 2 stderr, 3 both, or per local rank "
                        "'0:3,1:1' (torchrun's meaning)")
    p.add_argument("-t", "--tee", default=None, metavar="S",
                   help="streams to the log files and, prefixed, to the console (same values as --redirects)")
    p.add_argument("--local-ranks-filter", "--local_ranks_filter", default=None, metavar="RANKS",
                   help="only these local ranks ('0,1') reach the console; the files get every rank")
    p.add_argument("--role", default="rank", help="the console prefix is [<role><local rank>]: (default 'rank'; "
                   "torchrun's default role is 'default')")
    p.add_argument("--kill-grace", type=float, default=5.0)
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="the script is an executable, not a Python file")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=main)


def _tail(path: Optional[str], n: int = 25) -> str:
    if path is None:
        return "(its output went to the console)\n"
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class _Console:
    """The launcher's stdout and stderr, shared by the copying threads: whole lines, one at a time."""

    def __init__(self):
        self.lock = threading.Lock()

    def write(self, stream: int, data: bytes) -> None:
        f = sys.stdout if stream == OUT else sys.stderr
        with self.lock:
            f.flush()
            f.buffer.write(data)
            f.buffer.flush()


def _copy(fd: int, log, console: Optional[_Console], stream: int, prefix: bytes) -> None:
    """Copies one pipe to its log file and, prefixed line by line, to the console."""
    partial = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if console is None:
                continue
            *lines, partial = (partial + chunk).split(b"\n")
            if lines:
                console.write(stream, b"".join(prefix + ln + b"\n" for ln in lines))
    if console is not None and partial:
        console.write(stream, prefix + partial + b"\n")
    log.close()


class _Rank:
    """One local rank's process and where its two streams go (Note [Launch output as torchrun])."""

    def __init__(self, local: int, redirect: int, tee: int, shown: bool, log_dir: str, prefix: bytes):
        self.local = local
        self.files: dict[int, Optional[str]] = {}
        self.modes: dict[int, str] = {}
        for stream, name in ((OUT, "stdout"), (ERR, "stderr")):
            if (redirect | tee) & stream:
                self.files[stream] = os.path.join(log_dir, str(local), f"{name}.log")
                self.modes[stream] = "tee" if tee & stream and shown else "file"
            else:
                self.files[stream] = None
                self.modes[stream] = "console" if shown else "null"
        self.prefix = prefix
        self.threads: list[threading.Thread] = []
        self.proc: Optional[subprocess.Popen] = None

    def start(self, sup: Supervised, cmd: list[str], env: dict, console: _Console) -> subprocess.Popen:
        if any(self.files.values()):
            os.makedirs(os.path.dirname(next(f for f in self.files.values() if f)), exist_ok=True)
        kw, copies = {}, []
        for stream, key in ((OUT, "stdout"), (ERR, "stderr")):
            mode = self.modes[stream]
            if mode == "console":
                kw[key] = None
            elif mode == "null":
                kw[key] = subprocess.DEVNULL
            elif mode == "file":
                kw[key] = open(self.files[stream], "wb")
            else:
                r, w = os.pipe()
                kw[key] = w
                copies.append((r, open(self.files[stream], "wb"), stream))
        try:
            self.proc = sup.popen(cmd, env, stdin=subprocess.DEVNULL, **kw)
        finally:
            for v in kw.values():
                if isinstance(v, int) and v >= 0:
                    os.close(v)
                elif hasattr(v, "close"):
                    v.close()
        for r, log, stream in copies:
            t = threading.Thread(target=_copy, args=(r, log, console, stream, self.prefix), daemon=True)
            t.start()
            self.threads.append(t)
        return self.proc

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=10)

    def log_for_report(self) -> Optional[str]:
        return self.files[ERR] or self.files[OUT]


def _nproc(args, pool) -> int:
    if args.nproc_per_node == "gpu":
        if not pool:
            raise ValueError("--nproc-per-node gpu but no GPU is visible; give a number")
        return len(pool)
    try:
        nproc = int(args.nproc_per_node)
    except ValueError:
        raise ValueError(f"--nproc-per-node must be a number or 'gpu', got {args.nproc_per_node!r}") from None
    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    return nproc


def main(args) -> int:
    if args.cluster is not None:
        return _cluster(args)
    if args.env:
        print("gpufleet launch: --env applies to --cluster (local ranks inherit this environment)", file=sys.stderr)
        return 2
    if args.nnodes is None:
        args.nnodes = 1
    pool = _core.make_pool(_resolve_devices(args.devices))
    try:
        nproc = _nproc(args, pool)
        if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
            raise ValueError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
        if args.redirects is None and args.tee is None:
            redirects, tee = [0] * nproc, [3] * nproc
        else:
            redirects = parse_std(args.redirects or "0", nproc, "--redirects")
            tee = parse_std(args.tee or "0", nproc, "--tee")
        shown = set(range(nproc))
        if args.local_ranks_filter:
            if not re.fullmatch(r"\d+(,\d+)*", args.local_ranks_filter.strip()):
                raise ValueError(f"--local-ranks-filter {args.local_ranks_filter!r}: expected local ranks such as '0,1'")
            shown = {int(x) for x in args.local_ranks_filter.split(",")}
    except ValueError as e:
        print(f"gpufleet launch: {e}", file=sys.stderr)
        return 2
    port = args.master_port or (free_port(args.master_addr) if args.nnodes == 1 else 29500)
    run_id = _core.random_token()[:8]
    log_root = args.log_dir or os.path.join("gpufleet-launch-logs", run_id)
    os.makedirs(log_root, exist_ok=True)
    world = nproc * args.nnodes
    cmd = ([args.script] if args.no_python else [sys.executable, "-u", args.script]) + list(args.script_args)
    console = _Console()
    sup = Supervised(args.kill_grace)
    try:
        for restart in range(args.max_restarts + 1):
            attempt_dir = os.path.join(log_root, f"attempt_{restart}")
            ranks, procs = [], []
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
                r = _Rank(local, redirects[local], tee[local], local in shown, attempt_dir,
                          f"[{args.role}{local}]:".encode())
                ranks.append(r)
                procs.append(r.start(sup, cmd, env, console))
            print(f"gpufleet launch: {nproc} rank{'s' if nproc != 1 else ''} started (attempt {restart + 1}/"
                  f"{args.max_restarts + 1}, MASTER_PORT={port}, logs in {attempt_dir})", file=sys.stderr, flush=True)
            failed = None
            try:
                while failed is None and any(p.poll() is None for p in procs):
                    failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                    time.sleep(0.02)
                if failed is None:
                    failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
            except KeyboardInterrupt:
                print("gpufleet launch: interrupted: stopping every rank", file=sys.stderr)
                stop_group(procs, args.kill_grace)
                return 130
            if failed is None:
                for r in ranks:
                    r.join()
                print(f"gpufleet launch: all {nproc} ranks finished", file=sys.stderr)
                return 0
            code = procs[failed].returncode
            stop_group(procs, args.kill_grace)
            for p in procs:
                sup.forget(p)
            for r in ranks:
                r.join()
            rank = args.node_rank * nproc + failed
            log = ranks[failed].log_for_report()
            print(f"gpufleet launch: ROOT CAUSE: rank {rank} (local {failed}) failed first with {describe_exit(code)}; "
                  f"{'its log ' + log + ' ends with' if log else 'no log file'}:\n{_tail(log)}", file=sys.stderr)
            others = [f"rank {args.node_rank * nproc + i}: {describe_exit(p.returncode)}" for i, p in enumerate(procs)
                      if i != failed]
            if others:
                print("gpufleet launch: then stopped: " + ", ".join(others), file=sys.stderr)
            if restart < args.max_restarts:
                print(f"gpufleet launch: restarting the group ({restart + 1}/{args.max_restarts})", file=sys.stderr)
        return 1
    finally:
        sup.close()


def _cluster(args) -> int:
    """--cluster: Note [Ranks on a cluster] (gpufleet/cluster/_spawn.py)."""
    from .._extras import require

    refused = [flag for flag, given in (("--node-rank", args.node_rank), ("--redirects", args.redirects),
                                        ("--tee", args.tee), ("--local-ranks-filter", args.local_ranks_filter),
                                        ("--master-addr", args.master_addr != "127.0.0.1"))
               if given]
    if args.devices != "auto":
        refused.append("--devices")
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        print(f"gpufleet launch: --env {missing[0]}: no such variable in this environment", file=sys.stderr)
        return 2
    if refused:
        print(f"gpufleet launch: {', '.join(refused)} cannot be used with --cluster (Ray places every rank; each "
              "rank's output goes to its log files and, prefixed, to this console)", file=sys.stderr)
        return 2
    if args.nproc_per_node != "gpu" and not (args.nproc_per_node.isdigit() and int(args.nproc_per_node) >= 1):
        print(f"gpufleet launch: --nproc-per-node must be a number >= 1 or 'gpu', got {args.nproc_per_node!r}",
              file=sys.stderr)
        return 2
    try:
        require("ray", "ray", "gpufleet launch --cluster")
    except ImportError as e:
        print(f"gpufleet launch: {e}", file=sys.stderr)
        return 2
    from ..cluster import _spawn as _on_ray

    script = args.script if args.no_python and os.sep not in args.script else os.path.abspath(args.script)
    try:  # a Python script runs with each node's own interpreter (the host's sys.executable)
        return _on_ray.launch(args, [script] + list(args.script_args), python=not args.no_python)
    except (ValueError, RuntimeError, ConnectionError) as e:
        print(f"gpufleet launch: {e}", file=sys.stderr)
        return 2
