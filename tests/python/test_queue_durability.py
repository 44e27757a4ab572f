"""The queue under load and crashes, with real processes: submitters in several processes at once
racing to start the daemon (one daemon, no job lost or duplicated, unique ids), the daemon SIGKILLed
mid-run and restarted (nothing lost, no orphan, the running jobs attempted once more and recorded as
interrupted, no job ever running twice at once), and a restart that finds a job's end in the journal
but not in the queue (Note [Queue recovery] in python/gpufleet/queue/runner.py)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from dispatch_helpers.proc_utils import wait_for
from queue_helpers import lines, make_queue, queue, until  # noqa: F401 (fixtures)

from gpufleet import _core

_API_SUBMITTER = textwrap.dedent("""
    import json, os, sys, time
    import gpufleet
    start, n, tag, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    while not os.path.exists(start):
        time.sleep(0.001)
    ids = [gpufleet.submit(["sh", "-c", f"echo {tag}-{i} >> {log}"], gpus=i % 2).id for i in range(n)]
    print(json.dumps(ids))
""")

_CLI_SUBMITTER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    start, n, tag, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    while not os.path.exists(start):
        time.sleep(0.001)
    ids = []
    for i in range(n):
        r = subprocess.run([sys.executable, "-m", "gpufleet", "submit", "--", "sh", "-c", f"echo {tag}-{i} >> {log}"],
                           capture_output=True, text=True, check=True)
        ids.append(int(r.stdout))
    print(json.dumps(ids))
""")


def test_concurrent_submitters_race_to_start_one_daemon_and_lose_nothing(make_queue, tmp_path):
    q = make_queue("2")
    start, log = tmp_path / "go", tmp_path / "ran"
    plan = [("api", _API_SUBMITTER, 60)] * 4 + [("cli", _CLI_SUBMITTER, 12)] * 2
    procs = []
    for k, (kind, script, n) in enumerate(plan):
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(start), str(n), f"{kind}{k}", str(log)],
                                      env=q.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    assert q.daemon_pid() is None
    start.touch()  # all at once: every one of them finds no daemon and starts one
    ids, tokens = [], set()
    for (kind, _, n), (k, p) in zip(plan, enumerate(procs)):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        got = json.loads(out)
        assert len(got) == n
        ids += got
        tokens |= {f"{kind}{k}-{i}" for i in range(n)}
    assert len(set(ids)) == len(ids) == sum(n for _, _, n in plan)
    assert sorted(ids) == list(range(1, len(ids) + 1))
    assert q.gf("wait", *ids, timeout=300).returncode == 0
    ran = lines(log)
    assert len(ran) == len(ids) and set(ran) == tokens  # every job ran, and exactly once
    with open(os.path.join(q.dir, "daemon.log")) as f:
        assert f.read().count("queue daemon started") == 1


def test_daemon_sigkilled_mid_run_loses_nothing_leaves_no_orphan_and_reruns_the_running_jobs_once(make_queue,
                                                                                                    tmp_path):
    q = make_queue("2")
    q.gf("queue", "start", "--slots", "2", "--kill-grace", "1", check=True)
    log = tmp_path / "log"
    # Each job holds an exclusive lock on its own file while it runs: a second copy running at the same
    # time could not take it and would fail (flock -n). Its setsid grandchild leaves the job's process
    # group (only the run's marker still finds it).
    body = ("echo start $GPUFLEET_JOB_ID $GPUFLEET_ATTEMPT >> {log}; (setsid sleep 300 &); sleep 1.5; "
            "echo end $GPUFLEET_JOB_ID >> {log}")
    ids = [q.submit("flock", "-n", str(tmp_path / f"job{i}.lock"), "-c", body.format(log=log),
                    opts=["--after", "1"] if i == 9 else []) for i in range(10)]
    until(lambda: sum(1 for ln in lines(log) if ln.startswith("start")) >= 4, what="four jobs to start")
    running = {int(ln.split()[1]) for ln in lines(log) if ln.startswith("start")}
    running -= {int(ln.split()[1]) for ln in lines(log) if ln.startswith("end")}
    marker, pid = q.marker(), q.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    # the supervisor stops every process of the run, grandchildren that left their group included
    assert wait_for(lambda: _core.kill_marked_processes(marker, 0) == 0, 15), "processes outlived the daemon"
    killed = {int(ln.split()[1]) for ln in lines(log) if ln.startswith("start")} - \
        {int(ln.split()[1]) for ln in lines(log) if ln.startswith("end")}
    assert killed and killed >= running - {j for j in running if f"end {j}" in lines(log)}
    assert q.gf("queue", "start", check=True).returncode == 0
    assert q.gf("wait", *ids, timeout=300).returncode == 0
    ends = [ln for ln in lines(log) if ln.startswith("end")]
    assert sorted(int(ln.split()[1]) for ln in ends) == ids  # each job completed exactly once
    recs = {r["id"]: r for r in q.ls()}
    for jid in ids:
        assert recs[jid]["attempts"] == (2 if jid in killed else 1), (jid, recs[jid], killed)
    starts = [ln.split()[1:] for ln in lines(log) if ln.startswith("start")]
    for jid in killed:
        assert [a for j, a in starts if int(j) == jid] == ["1", "2"]
    db = sqlite3.connect(os.path.join(q.dir, "journal.sqlite"))
    try:
        rows = db.execute("SELECT key, attempt, status, message FROM attempts WHERE status='interrupted'").fetchall()
    finally:
        db.close()
    assert sorted(int(k[4:]) for k, a, _, _ in rows) == sorted(killed) and all(a == 1 for _, a, _, _ in rows)
    assert all("the queue daemon ended while it ran" in m for *_, m in rows)
    table = q.gf("ls").stdout.splitlines()
    assert sum(1 for ln in table if ln[:1].isdigit() and " succeeded " in ln) == len(ids)


def test_restart_takes_a_jobs_end_from_the_journal_when_the_queue_missed_it(queue, tmp_path):
    log = tmp_path / "ran"
    jid = queue.submit("sh", "-c", f"echo ran >> {log}")
    assert queue.gf("wait", jid).returncode == 0
    queue.gf("queue", "stop", check=True)
    # as if the daemon had been killed between the journal's commit of the end and its own
    db = sqlite3.connect(os.path.join(queue.dir, "queue.sqlite"))
    with db:
        db.execute("UPDATE jobs SET state='running', ended=NULL, exit_code=NULL WHERE id=?", (jid,))
    db.close()
    queue.gf("queue", "start", check=True)
    rec = queue.job(jid)
    assert rec["state"] == "succeeded" and rec["exit_status"] == 0 and rec["attempts"] == 1
    time.sleep(0.3)
    assert lines(log) == ["ran"]  # not run again
