"""``Pipeline.gpu(factory, cluster=...)``: a pipeline's device stage with its replicas on a Ray cluster.

Note [Pipeline stages on a cluster]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The rest of the pipeline (source, batching, the other stages, the sink, the report) stays in the
caller's process; the stage's replicas are the workers of a ``GPUExecutor(cluster=...)`` (Note
[Executor on a cluster]): ``replicas_per_device`` Ray actors on every GPU of every node, each
building its function once with ``factory(device)`` (``device`` is ``cuda:0`` there: the replica's
own GPU, which Ray named in its CUDA_VISIBLE_DEVICES), as a local replica does in its thread. The
stage has one thread per replica in the caller, each keeping two batches in flight, as a process
stage does, and the executor's shared queue gives each batch to the least busy replica. A replica
whose actor dies fails the batch it ran (the error policy decides) and is replaced. The report lists
the stage's replicas by node and device, and how many batches each GPU ran.
"""
from __future__ import annotations

from typing import Any, Callable

from . import _ray

_REPLICA: dict = {}  # in a replica's actor: its function


def plan(cluster: Any, replicas_per_device: int, devices: Any) -> int:
    """At ``.gpu()`` time, before any work: the stage's number of replicas (the cluster's GPUs times
    ``replicas_per_device``)."""
    if devices != "auto":
        raise ValueError(f".gpu(cluster=...) puts replicas on every GPU of the cluster; devices={devices!r} names "
                         "GPUs of this machine (leave devices='auto')")
    ray = _ray.connect(cluster, "Pipeline.gpu(cluster=...)")
    gpus = sum(n.gpus for n in _ray.gpu_nodes(ray))
    if gpus == 0:
        raise RuntimeError("Pipeline.gpu(cluster=...): the Ray cluster has no node with GPUs")
    return gpus * replicas_per_device


def _build(fn: Callable, factory: bool, to_device: bool) -> None:
    """The executor's initializer in each replica: the replica's function, built once."""
    from .._devices import Device
    from .._pipeline import _stager

    device = Device("cuda", 0)
    call = fn(device) if factory else fn
    if not callable(call):
        raise TypeError(f"the factory returned {call!r} for {device}, expected a callable")
    if to_device:
        stage_in, user = _stager(device), call
        call = lambda batch: user(stage_in(batch))  # noqa: E731
    _REPLICA["fn"] = call


def _call(batch: Any) -> Any:
    return _REPLICA["fn"](batch)


def start(cluster: Any, replicas_per_device: int, fn: Callable, factory: bool, to_device: bool):
    """The stage's executor and its call, prepared once (what a process stage holds)."""
    from .._executor import GPUExecutor

    pool = GPUExecutor(cluster=cluster, slots_per_device=replicas_per_device, initializer=_build,
                       initargs=(fn, factory, to_device), report=True)
    return pool, pool._prepare(_call)


def describe(pool) -> tuple[list, str]:
    """The stage's replicas (``"<node>/cuda:N"``, one entry each) and a note: batches per GPU."""
    replicas = sorted(s.device for s in pool._engine.slots)
    per = pool.report().devices
    done = ", ".join(f"{d} {v['tasks']}" for d, v in per.items() if v["tasks"])
    nodes = sorted({r.split("/")[0] for r in replicas})
    return replicas, (f"{len(replicas)} replicas on a Ray cluster of {len(nodes)} nodes ({', '.join(nodes)}); "
                      f"batches per GPU: {done or 'none'}")
