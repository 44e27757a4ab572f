"""A real multi-node Ray cluster on loopback for the cluster tests (tests/python/test_cluster_*.py).

Three nodes, each a raylet of its own with ``num_gpus`` Ray resources and its own simulated GPU
topology (the raylet's environment, which its workers, so its gpufleet agent, inherit, as a real
node's NVML would answer there), with a different memory per node. The tests run inside a network
namespace that holds only loopback (``make test-ray``: ``unshare -n``), so Ray's addresses are all
127.0.0.1 and nothing leaves the machine; each test module starts the cluster once.
"""
from __future__ import annotations

import json
import os
import time

import psutil
import pytest

# What a Ray test module marks itself with: the `ray` marker (make test-ray runs these, in their own
# network namespace), and Ray's own leaks ignored (it leaves /dev/null and log files open when it
# starts its processes, which Python reports as ResourceWarnings once they are collected). A test that
# hangs is stopped by a thread (stacks dumped, the run ends): SIGALRM, pytest-timeout's default, never
# fired for a test stuck in Thread.join with Ray connected, so a hang would have held CI to its limit.
MARKS = [pytest.mark.ray, pytest.mark.timeout(180, method="thread"), pytest.mark.filterwarnings("ignore::ResourceWarning"),
         pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

# name -> (GPUs, memory of each)
NODES = {"node-a": (2, 8 << 30), "node-b": (2, 16 << 30), "node-c": (3, 24 << 30)}
# Ray notices a node whose raylet stopped answering within ~2 s instead of ~30 s
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500,
                 "health_check_initial_delay_ms": 0}


def topology(name: str) -> str:
    gpus, memory = NODES[name]
    return json.dumps([{"name": f"Simulated {name} GPU", "total_memory": memory,
                        "uuid": f"GPU-{i:08x}-0000-4000-8000-{sum(map(ord, name)):012x}"} for i in range(gpus)])


HERE = os.path.dirname(os.path.abspath(__file__))


def _node_args(name: str) -> dict:
    gpus, _ = NODES[name]
    # the nodes import what the tests' functions import by reference (as a real cluster has the user's
    # packages installed on every node)
    path = os.pathsep.join([HERE, os.path.join(HERE, "dispatch_helpers"), os.environ.get("PYTHONPATH", "")])
    return {"num_cpus": 1, "num_gpus": gpus, "object_store_memory": 80 << 20,
            "env_vars": {"GPUFLEET_NODE_NAME": name, "GPUFLEET_SIMULATED_GPUS": topology(name), "PYTHONPATH": path}}


class LoopbackCluster:
    """``ray.cluster_utils.Cluster`` with our three nodes; this process is connected to the head
    (node-a), so node-b and node-c can be removed and added again."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.cluster = Cluster(initialize_head=True, connect=True,
                               head_node_args={**_node_args("node-a"), "_system_config": SYSTEM_CONFIG})
        self.nodes = {"node-a": self.cluster.head_node}
        for name in ("node-b", "node-c"):
            self.add(name)
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(**_node_args(name))

    def remove(self, name: str) -> None:
        """Kills the node's raylet and every process of it, as a machine that dies."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def heal(self) -> None:
        """Adds the nodes a test removed again, and waits until Ray sees them all."""
        for name in NODES:
            if name not in self.nodes:
                self.add(name)
        self.cluster.wait_for_nodes()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            alive = [n for n in self.ray.nodes() if n["Alive"]]
            if len(alive) == len(NODES) and self.ray.available_resources().get("GPU", 0) >= total_gpus():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not come back: {self.ray.nodes()}")

    def shutdown(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """The test module's cluster (its modules import this fixture: one cluster per module)."""
    c = LoopbackCluster()
    yield c
    c.shutdown()


def total_gpus() -> int:
    return sum(g for g, _ in NODES.values())


def processes_with(env_entry: str) -> list:
    """Live processes whose environment holds ``KEY=value`` (tasks inherit their task's env)."""
    key, _, value = env_entry.partition("=")
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(key) == value:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def raylets() -> list:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("raylet" in a for a in (p.info["cmdline"] or [])[:1])]
