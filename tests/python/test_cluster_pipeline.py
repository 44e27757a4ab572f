"""``Pipeline.gpu(factory, cluster=...)`` on a real three-node Ray cluster on loopback (cluster_helpers.py):
replicas as Ray actors on every GPU of every node, each built once, the report by node and device, a
replica killed mid-run."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import cluster_funcs as funcs  # noqa: E402
from cluster_helpers import MARKS, NODES, cluster, total_gpus  # noqa: E402,F401 - cluster: the fixture

pytestmark = MARKS


def test_replicas_on_every_gpu_of_every_node_each_built_once(cluster, tmp_path):
    factory = functools.partial(funcs.make_model, log_dir=str(tmp_path))
    report = (gpufleet.Pipeline(range(301), ordered=True)
              .batch(7)
              .gpu(factory, factory=True, replicas_per_device=2, cluster=cluster.address, name="model")
              .unbatch()
              .run())
    assert [r[0] for r in report.results] == [2 * x for x in range(301)]
    used = {r[1] for r in report.results}
    assert {u.split("/")[0] for u in used} == set(NODES)  # every node's replicas took batches
    builds = sorted(tmp_path.glob("build-*"))
    assert len(builds) == 2 * total_gpus()  # one build per replica (an actor each)
    assert all(b.read_text() == "cuda:0\n" for b in builds)  # each replica sees its own GPU as cuda:0
    stage = next(s for s in report.stages if s.name == "model")
    assert stage.workers == 2 * total_gpus() and stage.items_out == 301
    assert sorted(stage.devices) == sorted(f"{n}/cuda:{i}" for n, (g, _) in NODES.items() for i in range(g)
                                           for _ in range(2))
    assert "replicas on a Ray cluster of 3 nodes" in stage.note and "batches per GPU:" in stage.note
    assert "node-a/cuda:0" in report.summary()


def test_a_replica_killed_mid_run_fails_its_batch_and_is_replaced(cluster, tmp_path):
    factory = functools.partial(funcs.make_fragile_model, log_dir=str(tmp_path), fatal=100)
    report = (gpufleet.Pipeline(range(200), ordered=True, on_error="skip")
              .batch(5)
              .gpu(factory, factory=True, cluster=cluster.address, name="model")
              .unbatch()
              .run())
    assert (tmp_path / "killed").exists()
    failed = sorted(e.index for e in report.errors)
    assert failed == [100, 101, 102, 103, 104]  # the batch the dying replica ran, and nothing else
    assert all(isinstance(e.error, gpufleet.WorkerDiedError) for e in report.errors)
    assert [r[0] for r in report.results] == [2 * x for x in range(200) if not 100 <= x < 105]


def test_cluster_stage_arguments_are_checked_when_the_stage_is_added(cluster):
    with pytest.raises(ValueError, match="leave devices='auto'"):
        gpufleet.Pipeline(range(3)).gpu(funcs.double, devices=[0], cluster=cluster.address)
    with pytest.raises(ValueError, match="cluster must be"):
        gpufleet.Pipeline(range(3)).gpu(funcs.double, cluster="")
