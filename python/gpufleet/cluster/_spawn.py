"""``spawn(fn, cluster=...)`` and ``gpufleet launch --cluster``: ranks placed on a Ray cluster.

Note [Ranks on a cluster]
~~~~~~~~~~~~~~~~~~~~~~~~~
Ray places the ranks: a placement group reserves their GPUs at once (``spawn``: one GPU per rank,
packed onto as few nodes as possible; ``launch --nproc-per-node N``: N GPUs on each of ``--nnodes``
distinct nodes), so a job starts whole or not at all. On each reserved GPU a host actor (holding
that GPU, so Ray sets its CUDA_VISIBLE_DEVICES) starts the rank as a fresh process of its node,
exactly as a local ``spawn`` or ``launch`` starts one (_spawn.py: its own process group, tracked by
the node's supervisor, torchrun's environment), and reports how it ended. Ranks are numbered node by
node (``GROUP_RANK`` is the node's number, ``LOCAL_RANK`` the rank within its node), and
``MASTER_ADDR``/``MASTER_PORT`` are rank 0's node address and a port free there, so no one starts
anything by hand on each node. The first rank to fail stops the others (the kill sequence, on their
nodes) and is reported as ``torch.multiprocessing.spawn`` reports it, the node and device named; a
node lost mid-run fails its ranks the same way ("terminated with its node"). Output of a launched
command is written on the node to ``<log-dir>/attempt_<k>/<rank>/{stdout,stderr}.log`` (a shared file
system) and copied to the launcher's console prefixed with the global rank.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from .. import _serialize
from .._spawn_api import ProcessExitedException, free_port, joined, rank_failure
from . import _ray

START_TIMEOUT = 120.0


class RankHost:
    """A rank's GPU on its node, and the rank's process (the actor is wrapped with ``ray.remote``)."""

    def __init__(self, grace: float) -> None:
        from .._spawn import Supervised

        self.sup = Supervised(grace)
        self.grace = grace
        self.proc = self.rank = None
        self.lines: list = []
        self.lock = threading.Lock()
        self.copiers: list = []

    def where(self) -> dict:
        import ray

        return {"name": _ray.node_name(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "gpu": str((ray.get_gpu_ids() or ["?"])[0]),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def free_port(self) -> int:
        import ray

        return free_port(ray.util.get_node_ip_address())

    def start_fn(self, rank: int, device: str, env: dict, world: int, payload) -> int:
        """``fn(rank, *args)`` in a fresh worker process, as a local ``spawn`` rank."""
        from .._executor import _preparation
        from .._spawn import start_worker
        from .._spawn_api import _Rank

        proc, sock = start_worker(self.sup, env)
        self.rank = _Rank(rank, device, proc, sock)
        self.proc = proc
        self.rank.chan.send(("hello", _preparation("gpufleet-spawn"), "spawn",
                             {"rank": rank, "device": device, "slot": 0, "world_size": world}), payload)
        return proc.pid

    def start_cmd(self, argv: list, env: dict, cwd: Optional[str], log_dir: str, python: bool) -> int:
        """A launched command (a Python script with this node's interpreter when ``python``); its
        output to ``log_dir``/{stdout,stderr}.log and to ``output()``."""
        import subprocess

        if python:
            argv = [sys.executable, "-u"] + list(argv)
        os.makedirs(log_dir, exist_ok=True)
        self.proc = self.sup.popen(argv, env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=cwd if cwd and os.path.isdir(cwd) else None)
        for stream, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            t = threading.Thread(target=self._copy, args=(pipe, os.path.join(log_dir, f"{stream}.log"), stream),
                                 daemon=True)
            t.start()
            self.copiers.append(t)
        return self.proc.pid

    def _copy(self, pipe, path: str, stream: str) -> None:
        with open(path, "wb") as log:
            for line in iter(pipe.readline, b""):
                log.write(line)
                log.flush()
                with self.lock:
                    self.lines.append((stream, line))
        pipe.close()

    def output(self) -> list:
        with self.lock:
            out, self.lines = self.lines, []
        return out

    def wait(self) -> tuple:
        """Blocks until the rank ends: (its last message or None, exit code, pid)."""
        code = self.proc.wait()
        for t in self.copiers:
            t.join(10)
        message = None
        if self.rank is not None:
            self.rank.collect()
            message = self.rank.message
            self.rank.close()
        self.sup.forget(self.proc)
        return message, code, self.proc.pid

    def stop(self) -> None:
        from .._spawn import stop_group

        if self.proc is not None:
            stop_group([self.proc], self.grace)


class Group:
    """The placed ranks of one job: their hosts, in rank order, and each one's torchrun environment."""

    def __init__(self, ray, bundles: list, strategy: str, per_bundle: int, grace: float, feature: str):
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray, self.grace = ray, grace
        self.remove = remove_placement_group
        self.pg = placement_group(bundles, strategy=strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=START_TIMEOUT)
        if not ready:
            self.remove(self.pg)
            free = ray.available_resources().get("GPU", 0)
            raise RuntimeError(f"{feature}: the Ray cluster could not place {sum(b['GPU'] for b in bundles):g} GPUs "
                               f"({strategy.lower().replace('_', ' ')} of {bundles}) within {START_TIMEOUT:g} s; "
                               f"{free:g} GPUs are free now")
        cls = ray.remote(RankHost)
        hosts = [cls.options(num_gpus=1, num_cpus=0, max_concurrency=4, max_restarts=0,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b)
                             ).remote(grace) for b in range(len(bundles)) for _ in range(per_bundle)]
        where = ray.get([h.where.remote() for h in hosts])
        per_node = {w["node_id"]: w["name"] for w in where}
        names = dict(zip(per_node, _ray.unique_names(list(per_node.values()), list(per_node))))
        order = list(dict.fromkeys(w["node_id"] for w in sorted(where, key=lambda w: names[w["node_id"]])))
        ranked = sorted(zip(hosts, where), key=lambda hw: (order.index(hw[1]["node_id"]), hw[1]["gpu"]))
        self.hosts = [h for h, _ in ranked]
        self.where = [w for _, w in ranked]
        self.devices = [f"{names[w['node_id']]}/cuda:{w['gpu']}" for w in self.where]
        self.world = len(self.hosts)
        node_of = [order.index(w["node_id"]) for w in self.where]
        self.env = []
        for rank, w in enumerate(self.where):
            local = node_of[:rank].count(node_of[rank])
            self.env.append({"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(self.world),
                             "LOCAL_WORLD_SIZE": str(node_of.count(node_of[rank])), "GROUP_RANK": str(node_of[rank]),
                             "MASTER_ADDR": self.where[0]["ip"], "GPUFLEET_DEVICE": self.devices[rank],
                             "GPUFLEET_NODE": names[w["node_id"]], "GPUFLEET_SLOT": "0", "GPUFLEET_WORKER": str(rank),
                             "CUDA_VISIBLE_DEVICES": w["visible"]})

    def set_port(self, port: Optional[int]) -> int:
        port = port or self.ray.get(self.hosts[0].free_port.remote())
        for e in self.env:
            e["MASTER_PORT"] = str(port)
        return port

    def close(self) -> None:
        for h in self.hosts:
            try:
                self.ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            self.remove(self.pg)
        except Exception:  # noqa: BLE001
            pass


class ClusterSpawnContext:
    """``spawn(..., cluster=..., join=False)``: ``join(timeout)``, ``pids()``, ``devices``, as the local
    ``SpawnContext``."""

    def __init__(self, group: Group, pids: list):
        self._group = group
        self._pids = pids
        self.devices = list(group.devices)
        self._waits = {g.wait.remote(): rank for rank, g in enumerate(group.hosts)}
        self._closed = False

    def pids(self) -> list[int]:
        return list(self._pids)

    def join(self, timeout: Optional[float] = None) -> bool:
        """True when every rank ended well, False when ``timeout`` passed first; the first failure
        stops the other ranks and is raised."""
        ray = self._group.ray
        end = None if timeout is None else time.monotonic() + timeout
        while self._waits:
            left = None if end is None else max(0.0, end - time.monotonic())
            ready, _ = ray.wait(list(self._waits), num_returns=1, timeout=left)
            if not ready:
                return False
            for ref in ready:
                rank = self._waits.pop(ref)
                try:
                    message, code, pid = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the host (its node) is gone
                    self._stop()
                    raise ProcessExitedException(
                        f"process {rank} terminated with its node ({self.devices[rank]}, pid {self._pids[rank]}): "
                        f"{_ray.reason(e)}", rank, self._pids[rank], -9, "SIGKILL") from None
                if code != 0:
                    self._stop()
                    raise rank_failure(rank, self.devices[rank], pid, message, code)
        self._close()
        return True

    def _stop(self) -> None:
        ray = self._group.ray
        ray.wait([h.stop.remote() for h in self._group.hosts], num_returns=len(self._group.hosts),
                 timeout=self._group.grace + 10)
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._waits = {}
            self._group.close()


def spawn(fn: Callable, args: tuple, nprocs: Optional[int], join: bool, master_port: Optional[int],
          kill_grace: float, cluster: Any):
    ray = _ray.connect(cluster, "spawn(cluster=...)")
    payload = _serialize.dumps_checked((fn, tuple(args)), "the function and args of spawn()")
    total = sum(n.gpus for n in _ray.gpu_nodes(ray))
    if nprocs is None:
        nprocs = total
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or not 1 <= nprocs <= total:
        raise ValueError(f"spawn(cluster=...): nprocs={nprocs!r} but the cluster has {total} GPU"
                         f"{'s' if total != 1 else ''}; one process per GPU")
    group = Group(ray, [{"GPU": 1}] * nprocs, "PACK", 1, kill_grace, "spawn(cluster=...)")
    try:
        group.set_port(master_port)
        pids = ray.get([h.start_fn.remote(r, group.devices[r], group.env[r], group.world, payload)
                        for r, h in enumerate(group.hosts)])
    except BaseException:
        group.close()
        raise
    return joined(ClusterSpawnContext(group, pids), join)


def launch(args, cmd: list, python: bool) -> int:
    """``gpufleet launch --cluster``: the command on ranks placed by Ray; restarts as locally."""
    ray = _ray.connect(args.cluster, "gpufleet launch --cluster")
    nodes = _ray.gpu_nodes(ray)
    if args.nproc_per_node == "gpu":
        bundles, strategy, per = [{"GPU": 1}] * sum(n.gpus for n in nodes), "PACK", 1
    else:
        n = int(args.nproc_per_node)
        fit = [x for x in nodes if x.gpus >= n]
        nnodes = args.nnodes if args.nnodes is not None else len(fit)
        if not 1 <= nnodes <= len(fit):
            raise ValueError(f"--nnodes {nnodes} with --nproc-per-node {n}: {len(fit)} node"
                             f"{'s' if len(fit) != 1 else ''} of the cluster {'has' if len(fit) == 1 else 'have'} "
                             f"{n} GPUs or more")
        bundles, strategy, per = [{"GPU": n}] * nnodes, "STRICT_SPREAD", n
    log_root = os.path.abspath(args.log_dir or os.path.join("gpufleet-launch-logs", f"cluster-{os.getpid()}"))
    for restart in range(args.max_restarts + 1):
        group = Group(ray, bundles, strategy, per, args.kill_grace, "gpufleet launch --cluster")
        try:
            code = _attempt(group, args, cmd, python, log_root, restart)
        finally:
            group.close()
        if code == 0:
            return 0
        if code == 130:
            return 130
        if restart < args.max_restarts:
            print(f"gpufleet launch: restarting the group ({restart + 1}/{args.max_restarts})", file=sys.stderr)
    return 1


def _attempt(group: Group, args, cmd: list, python: bool, log_root: str, restart: int) -> int:
    ray = group.ray
    port = group.set_port(args.master_port)
    attempt_dir = os.path.join(log_root, f"attempt_{restart}")
    passed = {name: os.environ[name] for name in args.env}  # --env: as GNU parallel's
    envs = [{**passed, **e, "TORCHELASTIC_RESTART_COUNT": str(restart)} for e in group.env]
    ray.get([h.start_cmd.remote(cmd, envs[r], os.getcwd(), os.path.join(attempt_dir, str(r)), python)
             for r, h in enumerate(group.hosts)])
    print(f"gpufleet launch: {group.world} ranks started on {len({e['GPUFLEET_NODE'] for e in envs})} nodes "
          f"(attempt {restart + 1}/{args.max_restarts + 1}, MASTER_ADDR={envs[0]['MASTER_ADDR']}, MASTER_PORT={port}, "
          f"logs in {attempt_dir})", file=sys.stderr, flush=True)
    waits = {h.wait.remote(): r for r, h in enumerate(group.hosts)}
    codes: dict = {}
    try:
        while waits:
            ready, _ = ray.wait(list(waits), num_returns=1, timeout=0.2)
            _print_output(group, args.role)
            for ref in ready:
                r = waits.pop(ref)
                try:
                    codes[r] = ray.get(ref)[1]
                except Exception as e:  # noqa: BLE001 - its node is gone
                    codes[r] = -9
                    print(f"gpufleet launch: rank {r} lost with its node: {_ray.reason(e)}", file=sys.stderr)
            failed = [r for r, c in codes.items() if c != 0]
            if failed:
                break
    except KeyboardInterrupt:
        print("gpufleet launch: interrupted: stopping every rank", file=sys.stderr)
        ray.wait([h.stop.remote() for h in group.hosts], num_returns=len(group.hosts), timeout=args.kill_grace + 10)
        return 130
    _print_output(group, args.role)
    failed = [r for r, c in codes.items() if c != 0]
    if not failed:
        print(f"gpufleet launch: all {group.world} ranks finished", file=sys.stderr)
        return 0
    first = failed[0]
    ray.wait([h.stop.remote() for h in group.hosts], num_returns=len(group.hosts), timeout=args.kill_grace + 10)
    from .._spawn import describe_exit

    log = os.path.join(attempt_dir, str(first), "stderr.log")
    try:
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-25:])
    except OSError:
        tail = "(no log: is the log directory on a file system every node shares?)\n"
    print(f"gpufleet launch: ROOT CAUSE: rank {first} ({group.devices[first]}) failed first with "
          f"{describe_exit(codes[first])}; its log {log} ends with:\n{tail}", file=sys.stderr)
    return 1


def _print_output(group: Group, role: str) -> None:
    outs = group.ray.get([h.output.remote() for h in group.hosts])
    for rank, lines in enumerate(outs):
        for stream, line in lines:
            f = sys.stdout if stream == "stdout" else sys.stderr
            f.flush()
            f.buffer.write(f"[{role}{rank}]:".encode() + (line if line.endswith(b"\n") else line + b"\n"))
            f.buffer.flush()
