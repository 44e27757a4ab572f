"""``gpufleet.run(tasks, cluster=...)`` and ``gpufleet run --cluster`` on a real three-node Ray cluster on
loopback (cluster_helpers.py): real raylets, real agents, real task processes, a real journal. Each
node has its own simulated GPUs with its own memory (node-a 2 x 8 GiB, node-b 2 x 16 GiB, node-c 3 x
24 GiB). Faults are real: a node's raylet and every process of it killed mid-run, SIGINT and SIGKILL
to a driver process."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import gpufleet

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
from cluster_helpers import MARKS, NODES, cluster, processes_with, topology, total_gpus  # noqa: E402,F401 - cluster: the fixture
from proc_utils import stage_env, wait_for  # noqa: E402

pytestmark = MARKS
GiB = 1 << 30


@pytest.fixture
def healthy(cluster):
    """The cluster with all its nodes, before and after the test."""
    cluster.heal()
    yield cluster
    cluster.heal()


def _probe(tmp: Path, i: int, need: int, sleep: float, tag: str) -> gpufleet.Task:
    # What the task saw: its node, its GPU, its attempt and the node's GPU topology (the raylet's environment)
    script = ('printf "%s\\n%s\\n%s\\n%s\\n" "$GPUFLEET_NODE" "$CUDA_VISIBLE_DEVICES" "$GPUFLEET_ATTEMPT" '
              f'"$GPUFLEET_SIMULATED_GPUS" > {{output}}; sleep {sleep}')
    return gpufleet.Task(["sh", "-c", script], outputs=[tmp / f"t{i:03d}.txt"], min_free_memory=need or None,
                         env={"GF_CLUSTER_TEST": tag}, name=f"probe-{i}")


def _overlaps(report, needs: dict) -> dict:
    """Per device: the most tasks and the most declared memory running on it at one instant."""
    spans: dict = {}
    for a in report.attempts:
        for dev in a.devices:
            spans.setdefault(dev, []).append((a.start, a.end, needs[a.seq]))
    peak = {}
    for dev, s in spans.items():
        edges = sorted([(t0, 1, n) for t0, _, n in s] + [(t1, -1, n) for _, t1, n in s], key=lambda e: (e[0], e[1]))
        count = mem = top_count = top_mem = 0
        for _, step, n in edges:
            count += step
            mem += step * n
            top_count, top_mem = max(top_count, count), max(top_mem, mem)
        peak[dev] = (top_count, top_mem)
    return peak


# ---- a healthy run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(cluster, tmp_path_factory):
    """One run of 42 tasks with mixed memory needs, two slots per GPU, and its journal."""
    cluster.heal()
    tmp = tmp_path_factory.mktemp("mixed")
    needs = {i: [0, 6 * GiB, 12 * GiB, 20 * GiB, 0, 3 * GiB][i % 6] for i in range(42)}
    tasks = [_probe(tmp, i, needs[i], 0.05 + 0.05 * (i % 5), "mixed") for i in range(42)]
    report = gpufleet.run(tasks, cluster=cluster.address, slots_per_device=2, output="null",
                          journal=tmp / "journal.sqlite")
    return report, needs, tmp, tasks


def test_every_task_runs_once_on_a_gpu_of_its_own_node(mixed):
    report, needs, tmp, _ = mixed
    assert report.ok and report.succeeded == 42, report.summary()
    assert sorted(t.seq for t in report.tasks) == list(range(42))
    assert all(t.attempts == 1 and t.status == "succeeded" for t in report.tasks)
    visible = {d.label: d.visible_id for d in report.pool}
    for t in report.tasks:
        node, cvd, attempt, topo = (tmp / f"t{t.seq:03d}.txt").read_text().splitlines()
        assert node == t.node and t.devices == [f"{node}/cuda:{t.devices[0].rsplit(':', 1)[1]}"]
        assert topo == topology(node)  # the task ran on that node (its raylet's environment)
        assert cvd == visible[t.devices[0]] and 0 <= int(cvd) < NODES[node][0]
        assert attempt == "1"
    assert {t.node for t in report.tasks} == set(NODES)  # every node took work


def test_memory_and_slots_are_never_over_committed_on_any_node(mixed):
    report, needs, _, _ = mixed
    for dev, (count, mem) in _overlaps(report, needs).items():
        node = dev.split("/")[0]
        assert count <= 2, f"{dev} ran {count} tasks at once with 2 slots"
        assert mem <= NODES[node][1], f"{dev} had {mem / GiB:.0f} GiB of declared needs at once"
    by_seq = {t.seq: t.node for t in report.tasks}
    assert not [s for s, n in needs.items() if n > 8 * GiB and by_seq[s] == "node-a"]
    assert not [s for s, n in needs.items() if n > 16 * GiB and by_seq[s] != "node-c"]


def test_the_journal_names_each_tasks_node(mixed):
    report, _, tmp, tasks = mixed
    rows = sqlite3.connect(tmp / "journal.sqlite").execute("SELECT name, state, device, attempts FROM tasks").fetchall()
    assert len(rows) == 42 and {r[1] for r in rows} == {"succeeded"}
    where = {t.name: t.devices[0] for t in report.tasks}
    assert all(r[2] == where[r[0]] for r in rows)
    runs = sqlite3.connect(tmp / "journal.sqlite").execute("SELECT run_id, status FROM runs").fetchall()
    assert runs == [(report.run_id, "finished")]
    # the same journal resumes: nothing runs again
    again = gpufleet.run(tasks, cluster="auto", output="null", journal=tmp / "journal.sqlite", resume=True)
    assert again.counts["skipped"] == 42 and again.succeeded == 0


def test_report_trace_and_timeline_group_by_node(mixed, tmp_path):
    report, _, _, _ = mixed
    assert report.nodes == sorted(NODES)
    assert list(report.devices) == [f"{n}/cuda:{i}" for n in sorted(NODES) for i in range(NODES[n][0])]
    summary = report.summary()
    assert all(f"{n}/cuda:0" in summary for n in NODES)
    trace = json.loads(Path(report.to_chrome_trace(tmp_path / "t.json")).read_text())["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert sorted(procs.values()) == sorted(NODES)  # one process per node
    threads = {(e["pid"], e["args"]["name"]) for e in trace if e["name"] == "thread_name"}
    for e in trace:
        if e["ph"] == "X":
            node, dev = e["args"]["device"].split("/")
            assert procs[e["pid"]] == node and (e["pid"], f"{dev} slot " + str(
                next(a.slot for a in report.attempts if a.seq + 1 == e["args"]["task"]))) in threads
    pytest.importorskip("matplotlib")
    fig = report.plot_timeline()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "node-a cuda:0 slot 0" and labels[-1] == "node-c cuda:2 slot 1"
    assert len(labels) == total_gpus() * 2


# ---- what cannot run, and what runs anywhere ----------------------------------------------------

def test_tasks_that_fit_no_node_fail_at_once_and_cpu_and_multi_gpu_tasks_run(healthy, tmp_path):
    tasks = [gpufleet.Task(["true"], min_free_memory="30GiB", name="too-big"),
             gpufleet.Task(["true"], gpus=4, name="four-gpus"),
             gpufleet.Task(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES > {output}"], gpus=3, outputs=[tmp_path / "three"]),
             gpufleet.Task(["sh", "-c", "echo \"[$CUDA_VISIBLE_DEVICES] $GPUFLEET_NODE\" > {output}"], gpus=0,
                           outputs=[tmp_path / "cpu"])]
    report = gpufleet.run(tasks, cluster=healthy.address, output="null")
    by = {t.name: t for t in report.tasks}
    assert by["too-big"].status == "failed" and "no GPU of the cluster has that much" in by["too-big"].message
    assert by["four-gpus"].status == "failed"
    assert "the largest node of the cluster has 3" in by["four-gpus"].message
    three = by[tasks[2].name]
    assert three.status == "succeeded" and three.node == "node-c" and len(three.devices) == 3
    assert sorted((tmp_path / "three").read_text().strip().split(",")) == ["0", "1", "2"]
    cvd, node = (tmp_path / "cpu").read_text().split()
    assert cvd == "[]" and node in NODES and by[tasks[3].name].devices == []
    assert f"{node}/cpu" in report.devices


def test_a_failing_task_is_retried_on_another_gpu_and_bad_gpus_are_quarantined(healthy, tmp_path):
    flaky = gpufleet.Task(["sh", "-c", f'[ -e {tmp_path}/seen ] || {{ touch {tmp_path}/seen; exit 3; }}'], retries=2,
                          name="flaky")
    report = gpufleet.run([flaky], cluster=healthy.address, output="null", retry_backoff=0.05)
    first, second = report.attempts
    assert report.tasks[0].status == "succeeded" and report.tasks[0].attempts == 2
    assert first.status == "failed" and second.status == "succeeded" and first.devices != second.devices
    # every GPU fails twice in a row (two rounds of 7 failing tasks): all quarantined, the last 2 fail unstarted
    bad = [gpufleet.Task(["sh", "-c", "sleep 0.3; exit 1"], name=f"bad{i}") for i in range(16)]
    report = gpufleet.run(bad, cluster=healthy.address, output="null", quarantine_after=2)
    assert report.counts["failed"] == 16
    assert sorted(report.quarantined) == sorted(report.devices)  # every GPU of every node
    unstarted = [t for t in report.tasks if not t.devices]
    assert len(unstarted) == 2 and all(t.message == "every GPU of the cluster is quarantined" for t in unstarted)
    assert any("node-b/cuda:1 quarantined after 2 consecutive failed tasks" in m for m in report.messages)


def test_bad_cluster_arguments_fail_before_any_work(cluster, tmp_path):
    marker = tmp_path / "ran"
    for bad in ("", "  ", 6379, "two words"):
        with pytest.raises(ValueError, match="cluster must be"):
            gpufleet.run([["touch", str(marker)]], cluster=bad)
    with pytest.raises(ValueError, match="devices=.*leave devices='auto'"):
        gpufleet.run([["touch", str(marker)]], devices=[0], cluster="auto")
    with pytest.raises(ValueError, match="names another"):
        gpufleet.run([["touch", str(marker)]], cluster="127.0.0.1:1")
    not_a_journal = tmp_path / "x.sqlite"
    not_a_journal.write_text("hello")
    with pytest.raises(ValueError, match="is not a gpufleet journal"):
        gpufleet.run([["touch", str(marker)]], cluster="auto", journal=not_a_journal)
    assert not marker.exists() and not_a_journal.read_text() == "hello"


# ---- a node lost mid-run -------------------------------------------------------------------------

def test_a_node_removed_mid_run_has_its_tasks_finish_elsewhere(healthy, tmp_path):
    n = 30
    tasks = [_probe(tmp_path, i, 0, 1.0, "lost") for i in range(n)]
    out = {}
    runner = threading.Thread(target=lambda: out.update(r=gpufleet.run(
        tasks, cluster=healthy.address, output="null", journal=tmp_path / "j.sqlite")))
    runner.start()
    # node-b is removed while two tasks run there
    assert wait_for(lambda: sum(1 for f in tmp_path.glob(".t*.gfpart.txt")
                                if f.read_text().startswith("node-b")) == 2, 60)
    healthy.remove("node-b")
    runner.join(120)
    assert not runner.is_alive()
    report = out["r"]
    assert report.ok and report.succeeded == n, report.summary()
    assert any(m.startswith("node node-b lost") and "2 running tasks go to other nodes" in m for m in report.messages)
    lost = [a for a in report.attempts if a.status == "failed"]
    assert len(lost) == 2 and {a.node for a in lost} == {"node-b"}
    for a in lost:  # the new attempt ran elsewhere and is recorded as attempt 2
        t = next(t for t in report.tasks if t.seq == a.seq)
        assert t.attempts == 2 and t.node != "node-b"
        assert (tmp_path / f"t{a.seq:03d}.txt").read_text().splitlines()[2] == "2"
    # exactly once successfully: one succeeded attempt per task in the journal, the lost ones recorded
    db = sqlite3.connect(tmp_path / "j.sqlite")
    ok = db.execute("SELECT key, COUNT(*) FROM attempts WHERE status='succeeded' GROUP BY key").fetchall()
    assert len(ok) == n and {c for _, c in ok} == {1}
    msgs = [m for (m,) in db.execute("SELECT message FROM attempts WHERE status='failed'")]
    assert msgs == ["lost with its node node-b"] * 2
    assert not list(tmp_path.glob(".*gfpart*"))
    assert wait_for(lambda: not processes_with("GF_CLUSTER_TEST=lost"), 15), "a task of the run outlived it"


# ---- Ctrl-C and a killed driver (the driver in its own process) ----------------------------------

DRIVER = textwrap.dedent("""
    import json, sys
    import gpufleet
    address, n, sleep, tmp, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    tasks = [gpufleet.Task(["sh", "-c", f"echo $GPUFLEET_NODE > {tmp}/started-{i}; sleep {sleep}; echo ok > {{output}}"],
                           outputs=[f"{tmp}/out-{i}"], env={"GF_CLUSTER_TEST": tmp}, name=f"t{i}") for i in range(n)]
    r = gpufleet.run(tasks, cluster=address, output="null", kill_grace=1, **extra)
    print(json.dumps({"counts": r.counts, "drained": r.drained, "cancelled": r.cancelled, "messages": r.messages,
                      "nodes": sorted({t.node for t in r.tasks if t.node})}))
""")


def _driver(cluster, tmp_path, n, sleep, **extra):
    return subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(n), str(sleep), str(tmp_path),
                             json.dumps(extra)], env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _started(tmp_path):
    return {p.name for p in tmp_path.glob("started-*")}


def test_ctrl_c_drains_across_the_cluster(healthy, tmp_path):
    p = _driver(healthy, tmp_path, 40, 1.5)
    assert wait_for(lambda: len(_started(tmp_path)) >= total_gpus(), 60)
    before = _started(tmp_path)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    r = json.loads(out.splitlines()[-1])
    c = r["counts"]
    assert r["drained"] and not r["cancelled"]
    assert c["succeeded"] == len(_started(tmp_path)) and c["cancelled"] == 0 and c["failed"] == 0
    assert len(_started(tmp_path)) - len(before) <= total_gpus()  # what was starting as Ctrl-C came
    assert c["not_started"] == 40 - c["succeeded"]
    assert len(r["nodes"]) == 3 and any(m.startswith("draining:") for m in r["messages"])
    assert len(list(tmp_path.glob("out-*"))) == c["succeeded"]


def test_ctrl_c_twice_cancels_across_the_cluster(healthy, tmp_path):
    p = _driver(healthy, tmp_path, 40, 60)
    assert wait_for(lambda: len(_started(tmp_path)) >= total_gpus(), 60)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    r = json.loads(out.splitlines()[-1])
    c = r["counts"]
    assert r["cancelled"] and c["succeeded"] == 0 and c["cancelled"] == len(_started(tmp_path)) >= total_gpus()
    assert c["not_started"] == 40 - c["cancelled"] and len(r["nodes"]) == 3
    assert not list(tmp_path.glob("out-*")) and not list(tmp_path.glob(".out-*"))
    assert wait_for(lambda: not processes_with(f"GF_CLUSTER_TEST={tmp_path}"), 15)


def test_resume_after_the_driver_is_killed(healthy, tmp_path):
    journal = tmp_path / "j.sqlite"
    p = _driver(healthy, tmp_path, 30, 1.0, journal=str(journal))
    assert wait_for(lambda: len(list(tmp_path.glob("out-*"))) >= 10, 90)
    p.kill()
    p.wait()
    # Ray ends the agents of a dead driver, and their supervisors every task
    assert wait_for(lambda: not processes_with(f"GF_CLUSTER_TEST={tmp_path}"), 30), "tasks outlived their driver"
    done_before = {f.name for f in tmp_path.glob("out-*")}
    tasks = [gpufleet.Task(["sh", "-c", f"echo $GPUFLEET_NODE > {tmp_path}/started-{i}; sleep 1.0; "
                                        "echo ok > {output}"], outputs=[f"{tmp_path}/out-{i}"],
                           env={"GF_CLUSTER_TEST": str(tmp_path)}, name=f"t{i}") for i in range(30)]
    r = gpufleet.run(tasks, cluster=healthy.address, output="null", kill_grace=1, journal=journal, resume=True)
    assert r.ok and r.counts["skipped"] == len(done_before) and r.succeeded == 30 - len(done_before)
    assert {t.name for t in r.tasks if t.status == "skipped"} == {f"t{n.split('-')[1]}" for n in done_before}
    # every task succeeded exactly once over both runs: one succeeded attempt in the journal, or (killed
    # between its rename and its journal record) skipped by the resume as succeeded in the interrupted run
    db = sqlite3.connect(journal)
    ok = db.execute("SELECT key, COUNT(*) FROM attempts WHERE status='succeeded' GROUP BY key").fetchall()
    interrupted = [t for t in r.tasks if t.message.startswith("succeeded in an interrupted run")]
    assert {c for _, c in ok} == {1} and len(ok) + len(interrupted) == 30
    assert len(list(tmp_path.glob("out-*"))) == 30
    assert [s for (s,) in db.execute("SELECT status FROM runs ORDER BY started")] == ["running", "finished"]


# ---- the command line ----------------------------------------------------------------------------

def test_cli_run_and_info_on_the_cluster(healthy, tmp_path):
    env = stage_env()
    r = subprocess.run([sys.executable, "-m", "gpufleet", "run", "--cluster", healthy.address, "--log-dir",
                        str(tmp_path / "logs"), "--joblog", str(tmp_path / "joblog"), "sh", "-c",
                        "echo {} on $GPUFLEET_NODE", ":::", "x", "y", "z"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in (tmp_path / "joblog").read_text().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == ["1", "2", "3"] and all(r[1] in NODES for r in rows)  # Host: the node
    logs = sorted((tmp_path / "logs").glob("*/task-*.attempt-1.log"))
    assert len(logs) == 3 and len({p.parent for p in logs}) == 1  # one run directory for every node
    assert sorted(p.read_text().split()[0] for p in logs) == ["x", "y", "z"]
    assert all(p.read_text().split()[2] in NODES for p in logs)
    info = subprocess.run([sys.executable, "-m", "gpufleet", "info", "--cluster", healthy.address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    for name, (gpus, mem) in NODES.items():
        assert f"Simulated {name} GPU" in info.stdout
    assert info.stdout.count("Simulated node-c GPU") == 3
