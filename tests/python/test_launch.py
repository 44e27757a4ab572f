"""`gpufleet launch` as a real subprocess: torchrun's environment per rank, restarts of the whole group,
per-rank logs, the root cause printed first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpufleet

SCRIPT = Path(__file__).parent / "dispatch_helpers" / "train_script.py"
pytestmark = pytest.mark.timeout(120)


def _launch(tmp_path, *args, **env_extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(gpufleet.__file__))
    env["GPUFLEET_SIMULATED_GPUS"] = "3"
    env["OUT_DIR"] = str(tmp_path)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "gpufleet", "launch", "--log-dir", str(tmp_path / "logs"), *args,
                           str(SCRIPT), "--lr", "0.1 x"], env=env, capture_output=True, text=True, timeout=100)


def test_launch_sets_torchrun_environment(tmp_path):
    r = _launch(tmp_path)
    assert r.returncode == 0, r.stderr
    recs = [json.loads((tmp_path / f"a0-r{i}.json").read_text()) for i in range(3)]
    for i, rec in enumerate(recs):
        assert rec["RANK"] == rec["LOCAL_RANK"] == str(i) and rec["WORLD_SIZE"] == "3"
        assert rec["CUDA_VISIBLE_DEVICES"] == str(i) and rec["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert rec["GROUP_RANK"] == "0" and rec["argv"] == ["--lr", "0.1 x"]
    assert len({rec["MASTER_PORT"] for rec in recs}) == 1
    assert "rank 2 says hello" in (tmp_path / "logs" / "attempt0-rank2.log").read_text()


def test_launch_restarts_the_group_and_reports_the_root_cause(tmp_path):
    r = _launch(tmp_path, "--max-restarts", "2", "--nproc-per-node", "2", FAIL_FIRST="1")
    assert r.returncode == 0, r.stderr
    assert "ROOT CAUSE: rank 1" in r.stderr and "lost its data loader" in r.stderr
    assert r.stderr.index("ROOT CAUSE") < r.stderr.index("then stopped")
    assert json.loads((tmp_path / "a1-r0.json").read_text())["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert not (tmp_path / "a2-r0.json").exists()
    r = _launch(tmp_path, "--max-restarts", "1", "--nproc-per-node", "2", FAIL_ALWAYS="1")
    assert r.returncode == 1 and r.stderr.count("ROOT CAUSE") == 2


def test_launch_multi_node_ranks(tmp_path):
    r = _launch(tmp_path, "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2", "--master-port", "29999")
    assert r.returncode == 0, r.stderr
    recs = [json.loads((tmp_path / f"a0-r{i}.json").read_text()) for i in (2, 3)]
    assert [x["LOCAL_RANK"] for x in recs] == ["0", "1"] and {x["WORLD_SIZE"] for x in recs} == {"4"}
    assert {x["MASTER_PORT"] for x in recs} == {"29999"} and {x["GROUP_RANK"] for x in recs} == {"1"}


def test_ctrl_c_stops_every_rank(tmp_path):
    import signal
    import time

    import psutil

    env = dict(os.environ)
    env.update(PYTHONPATH=os.path.dirname(os.path.dirname(gpufleet.__file__)), GPUFLEET_SIMULATED_GPUS="2",
               OUT_DIR=str(tmp_path), SLEEP="60")
    p = subprocess.Popen([sys.executable, "-m", "gpufleet", "launch", "--log-dir", str(tmp_path / "logs"), str(SCRIPT)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while time.monotonic() < end and not (tmp_path / "a0-r0.json").exists():
        time.sleep(0.02)
    pid0 = json.loads((tmp_path / "a0-r0.json").read_text())["pid"]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted" in err
    time.sleep(0.1)
    assert not psutil.pid_exists(pid0) or psutil.Process(pid0).status() == psutil.STATUS_ZOMBIE
