"""``gpufleet info --cluster ADDRESS``: every node of a Ray cluster and its GPUs, each node described
by itself (its own discovery: NVML there, or its simulated topology), as ``gpufleet info`` would
print it on that node."""
from __future__ import annotations

from typing import Any

from . import _ray

TIMEOUT = 60.0  # seconds for every node to answer


def _describe_node() -> dict:
    """Runs on a node (a Ray task holding no resources): what ``gpufleet info`` shows there."""
    import os
    import socket

    from ..cli.info import info_dict

    # A task that asks for no GPU may be given CUDA_VISIBLE_DEVICES="" by Ray: the node's own view is
    # what its raylet was started with.
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    import ray

    return {"name": _ray.node_name(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "info": info_dict()}


def cluster_info(cluster: Any) -> list[dict]:
    """Every live node: its name, host, Ray's resources, and the ``info_dict()`` it reports."""
    ray = _ray.connect(cluster, "gpufleet info --cluster")
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: (n.get("NodeManagerAddress", ""),
                                                                               n["NodeID"]))
    fn = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(_describe_node)
    refs = [fn.options(scheduling_strategy=_ray.pinned(n["NodeID"])).remote() for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=TIMEOUT)
    out = []
    for n, ref in zip(nodes, refs):
        entry = {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                 "ray_gpus": n.get("Resources", {}).get("GPU", 0), "ray_cpus": n.get("Resources", {}).get("CPU", 0)}
        try:
            entry.update(ray.get(ref, timeout=0) if ref in ready else {"error": f"no answer within {TIMEOUT:g} s"})
        except Exception as e:  # noqa: BLE001 - a node without gpufleet, or one that died meanwhile
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out.append(entry)
    names = _ray.unique_names([e.get("name") or e["address"] or "?" for e in out], [e["node_id"] for e in out])
    for e, name in zip(out, names):
        e["name"] = name
    return sorted(out, key=lambda e: e["name"])


def render(nodes: list[dict]) -> str:
    from ..cli.info import _render_all

    gpus = sum(len(e["info"]["gpus"]) for e in nodes if "info" in e)
    blocks = [f"Ray cluster: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {gpus} GPU{'s' if gpus != 1 else ''}"]
    for e in nodes:
        head = (f"== node {e['name']} ({e.get('host', '?')}, {e['address']}, id {e['node_id'][:8]}): Ray lists "
                f"{e['ray_gpus']:g} GPU{'s' if e['ray_gpus'] != 1 else ''}, {e['ray_cpus']:g} CPUs ==")
        blocks.append(head + "\n" + (f"error: {e['error']}" if "error" in e else _render_all(e["info"])))
    return "\n\n".join(blocks)
