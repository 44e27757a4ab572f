"""`gpufleet launch` as a real subprocess: torchrun's environment per rank, restarts of the whole group,
per-rank logs, the root cause printed first; --tee / --redirects / --local-ranks-filter with torchrun's
meaning and its "[<role><local rank>]:" console prefix."""
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
    assert (tmp_path / "logs" / "attempt_0" / "2" / "stdout.log").read_text() == (
        "rank 2 says hello\nrank 2 ends without a newline")
    assert (tmp_path / "logs" / "attempt_0" / "2" / "stderr.log").read_text() == "rank 2 warns on stderr\n"
    # by default every rank reaches the console too, each line with torchrun's prefix
    for i in range(3):
        assert f"[rank{i}]:rank {i} says hello\n" in r.stdout and f"[rank{i}]:rank {i} ends without a newline\n" in r.stdout
        assert f"[rank{i}]:rank {i} warns on stderr\n" in r.stderr


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


def _console_ranks(text: str) -> set:
    return {ln for ln in text.splitlines() if "rank" in ln and "gpufleet launch" not in ln}


def test_redirects_sends_streams_to_files_only(tmp_path):
    r = _launch(tmp_path, "--nproc-per-node", "2", "--redirects", "3")
    assert r.returncode == 0, r.stderr
    assert not _console_ranks(r.stdout) and not _console_ranks(r.stderr)
    for i in range(2):
        assert "rank %d says hello" % i in (tmp_path / "logs" / "attempt_0" / str(i) / "stdout.log").read_text()
        assert "warns" in (tmp_path / "logs" / "attempt_0" / str(i) / "stderr.log").read_text()


def test_tee_one_stream_leaves_the_other_on_the_console_unprefixed(tmp_path):
    r = _launch(tmp_path, "--nproc-per-node", "2", "--tee", "1")
    assert r.returncode == 0, r.stderr
    assert "[rank0]:rank 0 says hello" in r.stdout.splitlines()
    assert "rank 1 warns on stderr" in r.stderr.splitlines()          # inherited, as torchrun leaves it
    assert not (tmp_path / "logs" / "attempt_0" / "0" / "stderr.log").exists()
    assert (tmp_path / "logs" / "attempt_0" / "0" / "stdout.log").exists()


def test_per_rank_maps_role_and_local_ranks_filter(tmp_path):
    r = _launch(tmp_path, "--nproc-per-node", "3", "--redirects", "0:3", "--tee", "1:2,2:3", "--role", "default",
                "--local-ranks-filter", "0,1")
    assert r.returncode == 0, r.stderr
    out, err = r.stdout.splitlines(), r.stderr.splitlines()
    assert not any("rank 0" in ln for ln in out + err)                 # redirected: files only
    assert "rank 1 says hello" in out and "[default1]:rank 1 warns on stderr" in err
    assert not any("rank 2" in ln for ln in out + err)                 # filtered off the console
    logs = tmp_path / "logs" / "attempt_0"
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*.log")) == [
        "0/stderr.log", "0/stdout.log", "1/stderr.log", "2/stderr.log", "2/stdout.log"]


@pytest.mark.parametrize("flag,value,message", [("--tee", "4", "--tee '4' is not understood"),
                                                ("--redirects", "0:5", "--redirects '0:5' is not understood"),
                                                ("--tee", "7:1", "names local rank 7, but there are 3"),
                                                ("--local-ranks-filter", "a", "expected local ranks")])
def test_bad_output_flags_name_the_value(tmp_path, flag, value, message):
    r = _launch(tmp_path, flag, value)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "a0-r0.json").exists()
