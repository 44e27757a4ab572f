"""Ray, for the cluster package only: the connection (``cluster=`` values), the cluster's GPU nodes,
node names, and which Ray errors mean that a node or an actor is gone."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from .. import _extras

ACCEPTED = "'auto' (the cluster this machine belongs to), 'ray://host:10001' (Ray Client) or a head address 'host:6379'"


def require(feature: str) -> Any:
    """Ray, or ``MissingExtraError`` naming ``feature`` and the ``ray`` extra (Note [Optional extras])."""
    return _extras.require("ray", "ray", feature)


def check_address(cluster: Any, feature: str) -> str:
    """The ``cluster=`` value, checked before anything is imported or started."""
    if not isinstance(cluster, str) or not cluster.strip() or any(c.isspace() for c in cluster.strip()):
        raise ValueError(f"{feature}: cluster must be {ACCEPTED}, got {cluster!r}")
    return cluster.strip()


def connect(cluster: Any, feature: str) -> Any:
    """Checks ``cluster``, imports Ray and connects this process to the cluster (once: a process
    already connected keeps its connection when ``cluster`` is 'auto' or names the same cluster)."""
    address = check_address(cluster, feature)
    ray = require(feature)
    if ray.is_initialized():
        current = _current_address(ray)
        if address == "auto" or current is None or _same(address, current):
            return ray
        raise ValueError(f"{feature}: this process is connected to the Ray cluster at {current}, and cluster="
                         f"{address!r} names another; call ray.shutdown() first, or pass cluster='auto'")
    try:
        # Ray's INFO lines ("Connecting to existing Ray cluster ...") would interleave with the run's output.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ("no Ray cluster is running on this machine (start one with `ray start --head`)" if address == "auto"
                else "is the head node up, and is this the address `ray start --head` printed?")
        raise ConnectionError(f"{feature}: cannot connect to the Ray cluster {address!r}: {e} ({hint})") from e
    return ray


def _current_address(ray) -> Optional[str]:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client, or a Ray without it
        return None


def _same(a: str, b: str) -> bool:
    strip = (lambda s: s.split("://", 1)[-1])
    return strip(a) == strip(b)


@dataclass(frozen=True)
class Node:
    """A live node of the cluster with GPUs, as Ray's resources list it."""

    node_id: str
    ip: str
    gpus: int
    cpus: float


def gpu_nodes(ray) -> list[Node]:
    """The live nodes with GPU resources, in a stable order (address, then node id)."""
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        if gpus >= 1:
            out.append(Node(n["NodeID"], n.get("NodeManagerAddress", "?"), gpus, float(res.get("CPU", 0))))
    return sorted(out, key=lambda n: (n.ip, n.node_id))


def pinned(node_id: str) -> Any:
    """Ray's scheduling strategy for an actor that must run on ``node_id`` and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def node_name() -> str:
    """This node's name in reports: $GPUFLEET_NODE_NAME when set (the node's environment, as
    `ray start` got it), else the host name."""
    import socket

    return os.environ.get("GPUFLEET_NODE_NAME") or socket.gethostname()


def unique_names(names: list[str], ids: list[str]) -> list[str]:
    """Node names made unique: a name shared by several nodes gets its node id's first characters."""
    return [n if names.count(n) == 1 else f"{n}#{i[:6]}" for n, i in zip(names, ids)]


def is_lost(exc: BaseException) -> bool:
    """Whether a Ray error means the actor (its process, its node) is gone, rather than that our
    own code raised in it (RayTaskError)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError) and not isinstance(exc, rex.RayActorError):
        return False
    return isinstance(exc, (rex.RayActorError, rex.RaySystemError, rex.ObjectLostError, rex.NodeDiedError,
                            rex.WorkerCrashedError, rex.OwnerDiedError, rex.GetTimeoutError))


def reason(exc: BaseException) -> str:
    """A Ray error in one line: its type and first line (Ray's messages run to pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def kill(ray, actor) -> None:
    """Ends an actor now (its process, and through its supervisor what it started); quiet if gone."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
