"""The driver's model of the cluster's GPUs and where a task goes next (Note [Feeding the nodes]).

Note [Feeding the nodes]
~~~~~~~~~~~~~~~~~~~~~~~~
The driver sends a task to a node only where it can start now: a node with enough GPUs that have a
free slot and, for a task with ``min_free_memory``, the memory on each of them by the rule of Note
[Memory-aware admission] (csrc/dispatch/admission.cpp), fed here by the samples the node's agent
sends (NVML there, or the node's simulated topology): the last free reading minus what was placed
there since that reading, and the total minus what every task placed there declared. Of the nodes
where it fits, the least loaded one takes it (the fraction of its GPU slots in use), and within a
node the least loaded GPUs, a retry avoiding the GPU that failed it; the task names the GPU planned
for it (its affinity there), and the agent's own dispatcher has the last word (it may start it on
another free GPU of the node: the driver follows what the agent reports). A task with ``affinity``
prefers that position of the cluster's GPU list (nodes in order, then their GPUs).

So that a short task's successor need not wait for a round trip to the driver, a single-GPU task
that declares no memory may also be sent ahead to a node whose slots are all busy, at most one per
GPU slot of the node (``prefetched``). It waits in the agent's inbox, not in its dispatcher, until a
slot is free there. When the driver's queue is empty and a node has a free slot while another
holds tasks sent ahead, the driver takes as many back (``Agent.withdraw``) and places them again.
A task that cannot fit anywhere in the cluster fails at once, as locally: more GPUs than the largest
node has, more memory than any GPU has in total, every GPU quarantined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .. import _devices


@dataclass
class ClusterDevice:
    """A GPU of the cluster as the report names it (Note [Reports by node]): ``label`` is
    ``"<node>/cuda:<ordinal>"``, the ordinal as the node's agent numbers its GPUs."""

    node: str
    ordinal: int
    name: str
    visible_id: str
    total_memory: Optional[int]

    @property
    def label(self) -> str:
        return f"{self.node}/cuda:{self.ordinal}"


class Dev:
    """One GPU in the driver's model."""

    def __init__(self, node: str, info: dict):
        self.ordinal = info["ordinal"]
        self.label = f"{node}/cuda:{self.ordinal}"
        self.total: Optional[int] = info.get("total")
        self.free: Optional[int] = info.get("free")
        self.load = 0  # tasks placed here and not ended (planned or running)
        self.reserved_all = self.reserved_since = 0
        self.failures = 0  # consecutive failed tasks (Note [Cluster runs]: quarantine is the driver's)
        self.quarantined = False

    def fits(self, need: int) -> bool:
        if need == 0 or self.free is None:
            return True
        if self.free < self.reserved_since or self.free - self.reserved_since < need:
            return False
        return self.total is None or (self.total >= self.reserved_all and self.total - self.reserved_all >= need)

    def take(self, need: int) -> None:
        self.load += 1
        self.reserved_all += need
        self.reserved_since += need

    def give(self, need: int) -> None:
        self.load -= 1
        self.reserved_all -= min(self.reserved_all, need)


class Node:
    """One node of the run: its agent (a Ray actor handle), its GPUs, the tasks it holds."""

    def __init__(self, actor: Any, name: str, desc: dict, slots: int, cpu_slots: Optional[int]):
        self.actor, self.name, self.desc = actor, name, desc
        self.node_id = desc["node_id"]
        self.devs = [Dev(name, d) for d in desc["devices"]]
        self.slots = slots
        self.cpu_free = cpu_slots or max(1, len(self.devs) * slots)
        self.flights: dict = {}  # seq -> Flight
        self.prefetched = 0
        self.alive = True
        self.ended = False
        self.marker = ""
        self.poll_ref: Any = None
        self.withdraw_ref: Any = None
        self.missing_memory_warned = False

    def healthy(self) -> list:
        return [d for d in self.devs if not d.quarantined]

    def free_gpu_slots(self) -> int:
        return sum(max(0, self.slots - d.load) for d in self.healthy())

    def load(self) -> float:
        healthy = self.healthy()
        return sum(d.load for d in healthy) / max(1, len(healthy) * self.slots)

    def sample(self, memory: list) -> None:
        """The agent's free/total readings, one per GPU (Note [Memory-aware admission]: what was
        placed since the last reading no longer counts against the new one)."""
        for d, (free, total) in zip(self.devs, memory):
            d.free, d.total = free, total if total is not None else d.total
            d.reserved_since = 0


class Flight:
    """A task sent to a node: planned GPUs (pool positions of the node; None when sent ahead),
    whether it started, where it runs."""

    __slots__ = ("pending", "planned", "started", "devices", "slot", "start")

    def __init__(self, pending, planned: Optional[list]):
        self.pending, self.planned = pending, planned
        self.started = False
        self.devices: list = []
        self.slot = -1
        self.start = 0.0


def never_fits(nodes: list, gpus: int, need: int) -> Optional[str]:
    """Why a task can run on no node of the cluster, or None."""
    alive = [n for n in nodes if n.alive]
    if gpus == 0:
        return None if alive else "no node of the cluster is left"
    healthy = [len(n.healthy()) for n in alive]
    if not any(healthy):
        return "every GPU of the cluster is quarantined" if alive else "no node of the cluster is left"
    if gpus > max(healthy):
        return (f"needs {gpus} GPUs on one node, but the largest node of the cluster has {max(healthy)}"
                f"{'' if max(healthy) == max(len(n.devs) for n in alive) else ' that are not quarantined'}")
    if need and not any(d.total is None or d.total >= need for n in alive for d in n.healthy()):
        return (f"needs {_devices.format_memory_size(need)} free GPU memory but no GPU of the cluster has that much "
                "in total")
    return None


def choose(nodes: list, gpus: int, need: int, avoid: Optional[tuple], prefer: Optional[tuple],
           may_prefetch: bool) -> Optional[tuple]:
    """(node, planned GPU positions) where a task can start now, (node, None) to send it ahead, or None."""
    alive = [n for n in nodes if n.alive and not n.ended]
    if gpus == 0:
        cands = [n for n in alive if n.cpu_free > 0]
        return (min(cands, key=lambda n: -n.cpu_free), []) if cands else None
    if prefer is not None:
        node, dev = prefer
        if node.alive and gpus == 1 and not dev.quarantined and dev.load < node.slots and dev.fits(need):
            return node, [node.devs.index(dev)]
    best = None
    for n in alive:
        cands = [i for i, d in enumerate(n.devs) if not d.quarantined and d.load < n.slots and d.fits(need)]
        if len(cands) < gpus:
            continue
        cands.sort(key=lambda i: ((n.name, n.devs[i].ordinal) == avoid, n.devs[i].load))
        key = (n.load(), avoid is not None and avoid[0] == n.name)
        if best is None or key < best[0]:
            best = (key, n, cands[:gpus])
    if best is not None:
        return best[1], best[2]
    if may_prefetch and gpus == 1 and need == 0:
        room = [n for n in alive if n.prefetched < len(n.healthy()) * n.slots]
        if room:
            return min(room, key=lambda n: (n.prefetched, n.load())), None
    return None
