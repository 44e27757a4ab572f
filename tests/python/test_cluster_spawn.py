"""``spawn(fn, cluster=...)`` and ``gpufleet launch --cluster`` on a real three-node Ray cluster on
loopback (cluster_helpers.py): Ray places the ranks, MASTER_ADDR/MASTER_PORT really let them meet,
torchrun's environment per node, a failing rank stops the others on every node."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import cluster_funcs as funcs  # noqa: E402
from cluster_helpers import MARKS, NODES, cluster, processes_with, total_gpus  # noqa: E402,F401 - cluster: the fixture
from proc_utils import stage_env, wait_for  # noqa: E402

pytestmark = MARKS


def _ranks(tmp_path):
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(len(list(tmp_path.glob("rank-*"))))]


def test_spawn_places_a_rank_on_every_gpu_and_they_meet_at_the_master(cluster, tmp_path):
    assert gpufleet.spawn(funcs.rendezvous, args=(str(tmp_path),), cluster=cluster.address) is None
    ranks = _ranks(tmp_path)
    assert len(ranks) == total_gpus()
    assert ranks[0]["met"] == list(range(1, total_gpus()))  # every rank reached rank 0's MASTER_ADDR:MASTER_PORT
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks} == {(ranks[0]["MASTER_ADDR"], ranks[0]["MASTER_PORT"])}
    assert {r["WORLD_SIZE"] for r in ranks} == {str(total_gpus())}
    by_node: dict = {}
    for i, r in enumerate(ranks):
        assert r["RANK"] == str(i) and r["GPUFLEET_NODE"] == r["GPUFLEET_NODE_NAME"]
        assert r["worker_device"] == r["GPUFLEET_DEVICE"] == f"{r['GPUFLEET_NODE']}/cuda:{r['CUDA_VISIBLE_DEVICES']}"
        by_node.setdefault(r["GPUFLEET_NODE"], []).append(r)
    assert sorted(by_node) == sorted(NODES)
    for group, (node, rs) in enumerate(sorted(by_node.items(), key=lambda kv: int(kv[1][0]["RANK"]))):
        assert [r["LOCAL_RANK"] for r in rs] == [str(i) for i in range(NODES[node][0])]  # node by node
        assert {r["LOCAL_WORLD_SIZE"] for r in rs} == {str(NODES[node][0])} and {r["GROUP_RANK"] for r in rs} == {
            str(group)}
        assert len({r["CUDA_VISIBLE_DEVICES"] for r in rs}) == len(rs)  # one GPU each


def test_a_failing_rank_stops_the_others_on_every_node(cluster, tmp_path):
    ctx = gpufleet.spawn(funcs.rendezvous, args=(str(tmp_path), 3), nprocs=5, cluster=cluster.address, join=False,
                         kill_grace=1)
    pids = ctx.pids()
    assert len(pids) == 5
    with pytest.raises(gpufleet.ProcessRaisedException) as info:
        ctx.join(60)
    e = info.value
    assert e.error_index == 3 and "RuntimeError: rank 3 gives up" in e.msg
    assert f"-- Process 3 ({ctx.devices[3]}, pid {e.pid}) terminated with the following error" in e.msg
    assert ctx.devices[3].split("/")[0] in NODES
    assert wait_for(lambda: not [p for p in pids if p in _live(pids)], 20), "a rank outlived the failure"


def _live(pids):
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


SCRIPT = textwrap.dedent("""
    import os, sys
    print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "local", os.environ["LOCAL_RANK"], "node",
          os.environ["GPUFLEET_NODE"], "group", os.environ["GROUP_RANK"], "gpu", os.environ["CUDA_VISIBLE_DEVICES"],
          "restart", os.environ["TORCHELASTIC_RESTART_COUNT"], flush=True)
    if os.environ["RANK"] == os.environ.get("FAIL_RANK"):
        print("giving up", file=sys.stderr, flush=True)
        sys.exit(7)
""")


def test_launch_runs_nproc_per_node_ranks_on_every_node(cluster, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "gpufleet", "launch", "--cluster", cluster.address, "--nproc-per-node",
                        "2", "--log-dir", str(tmp_path / "logs"), str(script)], env=stage_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("[rank"))
    assert len(lines) == 6  # 2 ranks on each of the 3 nodes
    words = [ln.split() for ln in lines]
    assert sorted(w[1] for w in words) == [str(i) for i in range(6)] and {w[3] for w in words} == {"6"}
    nodes = {}
    for w in words:
        nodes.setdefault(w[7], set()).add((w[5], w[9]))
        assert w[0] == f"[rank{w[1]}]:rank"
    assert sorted(nodes) == sorted(NODES) and all(len(v) == 2 for v in nodes.values())
    logs = sorted((tmp_path / "logs" / "attempt_0").glob("*/stdout.log"))
    assert len(logs) == 6 and all(p.read_text().startswith(f"rank {p.parent.name} ") for p in logs)


def test_launch_reports_the_root_cause_and_restarts(cluster, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "gpufleet", "launch", "--cluster", cluster.address, "--nproc-per-node",
                        "1", "--nnodes", "2", "--max-restarts", "1", "--kill-grace", "1", "--env", "FAIL_RANK", "--log-dir",
                        str(tmp_path / "logs"), str(script)], env=stage_env(FAIL_RANK="1"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("ROOT CAUSE: rank 1") == 2 and "exit code 7" in r.stderr and "giving up" in r.stderr
    assert "restarting the group (1/1)" in r.stderr
    assert {ln.split()[-1] for ln in r.stdout.splitlines() if ln.startswith("[rank0]")} == {"0", "1"}


def test_cluster_arguments_of_spawn_and_launch_are_checked(cluster, tmp_path):
    with pytest.raises(ValueError, match="nprocs=99 but the cluster has 7 GPUs"):
        gpufleet.spawn(funcs.rendezvous, args=(str(tmp_path),), nprocs=99, cluster=cluster.address)
    with pytest.raises(ValueError, match="leave devices='auto'"):
        gpufleet.spawn(funcs.rendezvous, devices=[0], cluster=cluster.address)
    r = subprocess.run([sys.executable, "-m", "gpufleet", "launch", "--cluster", cluster.address, "--tee", "3",
                        "x.py"], env=stage_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--tee cannot be used with --cluster" in r.stderr
    assert not processes_with(f"GF_CLUSTER_TEST={tmp_path}")
