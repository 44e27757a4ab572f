"""The queue that outlives the shell, through its command line and its Python API, with a real daemon
and real jobs: exit statuses as `wait` (task-spooler's -w) returns them, the environment and
directory a job gets, dependencies and their failures, priorities, cancel of queued and running jobs,
tail, memory-aware admission and GPU counts on simulated GPUs, stop with and without drain."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from dispatch_helpers.proc_utils import alive, wait_for
from queue_helpers import api_queue, lines, make_queue, queue, until  # noqa: F401 (fixtures)

import gpufleet


def test_first_submit_starts_a_daemon_that_outlives_the_shell_and_wait_returns_exit_statuses(queue, tmp_path):
    assert queue.daemon_pid() is None
    ok = queue.submit("sh", "-c", 'echo "$FOO|$(pwd)|$CUDA_VISIBLE_DEVICES|$GPUFLEET_JOB_ID" > out.txt',
                      env={"FOO": "bar baz"}, cwd=tmp_path)
    pid = queue.daemon_pid()
    assert pid is not None and os.getppid() != pid
    with open(f"/proc/{pid}/stat") as f:  # its own session, no terminal: a hangup does not reach it
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) == pid and int(fields[4]) == 0
    codes = {ok: 0}
    codes[queue.submit("sh", "-c", "exit 3")] = 3
    codes[queue.submit("sh", "-c", "kill -KILL $$")] = 128 + 9
    codes[queue.submit("sleep", "30", opts=["--timeout", "0.5"])] = 124
    codes[queue.submit("no-such-program-here")] = 127
    codes[queue.submit("--gpus", "0", "--", "true")] = 127  # the words after -- are the command
    for jid, code in codes.items():
        r = queue.gf("wait", jid)
        assert r.returncode == code, (jid, r.stderr)
    assert queue.gf("wait", ok, list(codes)[1], list(codes)[2]).returncode == 3  # the first that failed
    assert queue.gf("wait", ok).returncode == 0
    assert (tmp_path / "out.txt").read_text() == f"bar baz|{tmp_path}|{queue.job(ok)['devices'][0][5:]}|{ok}\n"
    recs = {r["id"]: r for r in queue.ls()}
    assert [recs[j]["exit_status"] for j in codes] == list(codes.values())
    assert recs[ok]["node"] == socket.gethostname() and recs[ok]["devices"][0] in ("cuda:0", "cuda:1")
    assert recs[list(codes)[3]]["state"] == "timed_out"
    assert "No such file" in recs[list(codes)[4]]["message"]
    table = queue.gf("ls", check=True).stdout
    assert "timed_out" in table and "no-such-program-here" in table and "exit status 3" in table


def test_dependencies_run_in_order_and_a_failure_fails_its_dependants_visibly(queue, tmp_path):
    log = tmp_path / "order"
    a = queue.submit("sh", "-c", f"sleep 0.5; echo a >> {log}")
    b = queue.submit("sh", "-c", f"echo b >> {log}", opts=["--after", a])
    gate = tmp_path / "gate"
    c = queue.submit("sh", "-c", f"test -e {gate} && echo c >> {log}")  # fails until the gate exists
    d = queue.submit("sh", "-c", f"echo d >> {log}", opts=["--after", f"{c},{a}"])
    e = queue.submit("sh", "-c", f"echo e >> {log}", opts=["-d"])  # after the previous job (d)
    assert queue.gf("wait", b).returncode == 0
    assert queue.gf("wait", e).returncode == 125
    recs = {r["id"]: r for r in queue.ls()}
    assert recs[b]["started"] >= recs[a]["ended"]
    assert lines(log)[:2] == ["a", "b"] and "d" not in lines(log) and "e" not in lines(log)
    assert (recs[c]["state"], recs[d]["state"], recs[e]["state"]) == ("failed", "dependency_failed",
                                                                      "dependency_failed")
    assert f"job {c}" in recs[d]["message"] and f"job {d}" in recs[e]["message"]
    assert recs[e]["after"] == [d] and recs[d]["after"] == [a, c]
    out = queue.gf("ls").stdout
    assert f"not run: job {c}, which it runs after, ended failed" in out
    assert f"not run: job {d}, which it runs after, ended dependency_failed" in out
    late = queue.submit("true", opts=["--after", c])  # after a job that already failed
    assert queue.job(late)["state"] == "dependency_failed"
    gate.touch()
    r = queue.gf("retry", c, check=True)
    assert r.stdout.split(":")[1].split(",") and {str(c), str(d), str(e), str(late)} <= set(
        r.stdout.split(":")[1].replace(" ", "").strip().split(","))
    assert queue.gf("wait", e, late).returncode == 0
    assert sorted(lines(log)) == ["a", "b", "c", "d", "e"]
    assert queue.job(c)["attempts"] == 2


def test_priority_and_cancel_of_queued_and_running_jobs(make_queue, tmp_path):
    q = make_queue("1")
    q.gf("queue", "start", "--kill-grace", "1", check=True)
    pidfile = tmp_path / "pid"
    # a running job that ignores SIGTERM: the kill sequence still ends it (SIGKILL after the grace)
    blocker = q.submit("sh", "-c", f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.1; done")
    low = q.submit("sh", "-c", f"echo low >> {tmp_path / 'order'}")
    high = q.submit("sh", "-c", f"echo high >> {tmp_path / 'order'}", opts=["--priority", "5"])
    doomed = q.submit("true")
    until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the blocker to start")
    pid = int(pidfile.read_text())
    r = q.gf("cancel", doomed, check=True)
    rec = q.job(doomed)
    assert rec["state"] == "cancelled" and rec["started"] is None and rec["exit_status"] == 143
    t0 = time.monotonic()
    q.gf("cancel", blocker, check=True)
    assert 0.8 < time.monotonic() - t0 < 20 and not alive([pid])
    rec = q.job(blocker)
    assert rec["state"] == "cancelled" and rec["signal"] == 9 and "cancelled by root while it ran" in rec["message"]
    assert q.gf("wait", low, high).returncode == 0
    assert lines(tmp_path / "order") == ["high", "low"]
    r = q.gf("cancel", low)
    assert r.returncode == 0 and f"job {low} had already ended (succeeded)" in r.stderr
    assert q.gf("cancel", 999).returncode == 1


def test_tail_shows_the_last_lines_and_follows_a_job_to_its_exit_status(queue, tmp_path):
    jid = queue.submit("sh", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done; echo err >&2; exit 7")
    r = queue.gf("tail", "-f", jid)
    assert r.returncode == 7
    assert r.stdout.splitlines()[-1] == "err" and "line 5" in r.stdout
    assert queue.gf("tail", "-n", "2", jid).stdout == "line 5\nerr\n"
    assert queue.gf("tail", "-n", "all", jid).stdout.splitlines()[0] == "line 1"
    assert queue.gf("tail", "-n", "x", jid).returncode == 2


def test_memory_admission_and_gpu_counts_apply_to_queued_jobs(make_queue):
    q = make_queue(json.dumps([{"free_memory": "10GiB"}, {"free_memory": "60GiB"}]))
    fits = q.submit("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"', opts=["--min-free-memory", "20GiB"])
    both = q.submit("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"', opts=["--gpus", "2"])
    cpu = q.submit("sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"', opts=["--gpus", "0"])
    never = q.submit("true", opts=["--min-free-memory", "100GiB"])
    assert q.gf("wait", fits, both, cpu).returncode == 0
    assert q.gf("tail", fits).stdout == "1\n" and q.gf("tail", both).stdout in ("0,1\n", "1,0\n")
    assert q.gf("tail", cpu).stdout == "[]\n"
    assert q.gf("wait", never).returncode == 1
    assert "no device of the pool has that much in total" in q.job(never)["message"]
    r = q.gf("submit", "--gpus", "3", "--", "true")
    assert r.returncode == 2 and "--gpus 3: the queue's GPU pool has 2 (cuda:0, cuda:1)" in r.stderr


def test_bad_input_is_refused_with_a_message_naming_it(queue, tmp_path):
    cases = [
        (["submit", "--gpus", "-1", "--", "true"], "gpus must be >= 0, got -1"),
        (["submit", "--timeout", "-2", "--", "true"], "timeout must be a positive number of seconds, got -2.0"),
        (["submit", "--min-free-memory", "lots", "--", "true"], "lots"),
        (["submit", "--after", "77", "--", "true"], "--after 77: no such job"),
        (["submit", "--after", "x1", "--", "true"], "'x1' is not a job id"),
        (["submit", "--"], "no command"),
        (["submit", "--output", "o.txt", "--", "true"], "never uses {output}"),
        (["submit", "--env", "NOEQUALS", "--", "true"], "--env 'NOEQUALS': expected NAME=VALUE"),
        (["submit", "--env", "CUDA_VISIBLE_DEVICES=3", "--", "true"], "env may not set CUDA_VISIBLE_DEVICES"),
        (["submit", "--", "a\0b"], None),
        (["tail", "41"], "job 41: no such job"),
        (["wait", "0"], "'0' is not a job id"),
        (["retry", "41"], "job 41: no such job"),
    ]
    for args, text in cases:
        if "\0" in "".join(args):
            continue  # argv cannot carry a NUL byte; the API case is below
        r = queue.gf(*args)
        assert r.returncode in (1, 2), (args, r.stdout, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert queue.ls() == []  # nothing bad got in
    running = queue.submit("sleep", "5")
    r = queue.gf("retry", running)
    assert r.returncode == 1 and "retry takes a job that has ended" in r.stderr


def test_python_api_submit_returns_a_job_handle(api_queue, tmp_path):
    out = tmp_path / "result.txt"
    first = gpufleet.submit(["sh", "-c", "echo one; sleep 0.3"], cwd=tmp_path)
    second = gpufleet.submit(f"echo two $WHO > {out}", shell=True, after=[first], env={"WHO": "api"}, gpus=0)
    assert isinstance(second, gpufleet.Job) and second.id == first.id + 1
    assert second.status in ("queued", "running", "succeeded")
    assert second.wait() == 0 and first.status == "succeeded"
    assert out.read_text() == "two api\n" and first.log == "one\n"
    slow = gpufleet.submit(["sleep", "30"])
    with pytest.raises(TimeoutError, match=f"job {slow.id} is still"):
        slow.wait(timeout=0.3)
    assert slow.cancel() == "cancelled" and slow.wait() == 143 and slow.info["state"] == "cancelled"
    assert gpufleet.Job(first.id) == first and repr(first) == f"Job({first.id})"
    with pytest.raises(gpufleet.QueueError, match="no such job"):
        gpufleet.Job(9999).status
    with pytest.raises(ValueError, match="NUL byte"):
        gpufleet.submit(["echo", "a\0b"])
    with pytest.raises(TypeError, match="must be a list of arguments"):
        gpufleet.submit("echo hi")
    with pytest.raises(ValueError, match="positive integer"):
        gpufleet.Job(0)
    failing = gpufleet.submit(["sh", "-c", "exit 5"], retries=1)
    assert failing.wait() == 5 and failing.info["attempts"] == 2


def test_output_is_renamed_into_place_only_on_success(queue, tmp_path):
    good = queue.submit("sh", "-c", "echo data > {output}", opts=["--output", "res/good.txt"], cwd=tmp_path)
    bad = queue.submit("sh", "-c", "echo part > {output}; exit 1", opts=["--output", "res/bad.txt"], cwd=tmp_path)
    assert queue.gf("wait", good).returncode == 0 and queue.gf("wait", bad).returncode == 1
    assert (tmp_path / "res" / "good.txt").read_text() == "data\n"
    assert sorted(os.listdir(tmp_path / "res")) == ["good.txt"]
    again = queue.submit("sh", "-c", "echo new > {output}", opts=["--output", "res/good.txt"], cwd=tmp_path)
    assert queue.gf("wait", again).returncode == 0  # a later job may write a finished job's output
    assert (tmp_path / "res" / "good.txt").read_text() == "new\n"


def test_stop_drain_lets_jobs_finish_and_stop_queues_running_jobs_again(queue, tmp_path):
    log = tmp_path / "log"
    finishing = queue.submit("sh", "-c", f"sleep 1; echo done $GPUFLEET_ATTEMPT >> {log}")
    waiting = [queue.submit("sh", "-c", f"echo later >> {log}", opts=["--after", finishing])]
    queue.wait_state(finishing, "running")
    r = queue.gf("queue", "stop", "--drain", check=True)
    assert "stopped" in r.stdout and queue.daemon_pid() is None
    assert lines(log) == ["done 1"]
    assert queue.job(waiting[0])["state"] == "queued"  # read from the file: the daemon is gone
    assert "queue not running" in queue.gf("ls").stdout
    r = queue.gf("wait", waiting[0])
    assert r.returncode == 1 and "not running" in r.stderr
    interrupted = queue.submit("sh", "-c", f"echo start $GPUFLEET_ATTEMPT >> {log}; sleep 30")  # restarts the daemon
    assert queue.gf("wait", waiting[0]).returncode == 0
    until(lambda: f"start 1" in lines(log), what="the job to start")
    r = queue.gf("queue", "stop", check=True)
    assert f"queued again: {interrupted}" in r.stdout
    rec = queue.job(interrupted)
    assert rec["state"] == "queued" and rec["attempts"] == 1 and "interrupted: the queue stopped" in rec["message"]
    queue.gf("queue", "start", check=True)
    until(lambda: "start 2" in lines(log), what="the second attempt")
    queue.gf("cancel", interrupted, check=True)
    journal = queue.gf("journal", os.path.join(queue.dir, "journal.sqlite"), "--json", check=True)
    assert "interrupted" in journal.stdout


def test_quarantine_applies_to_queued_jobs_and_gpu_jobs_wait_instead_of_failing(make_queue, tmp_path):
    q = make_queue("1")
    q.gf("queue", "start", "--quarantine-after", "1", check=True)
    bad = q.submit("sh", "-c", "exit 9")
    assert q.gf("wait", bad).returncode == 9
    held = q.submit("true")
    cpu = q.submit("true", opts=["--gpus", "0"])
    assert q.gf("wait", cpu).returncode == 0  # CPU jobs go on
    assert "cuda:0 quarantined after 1 consecutive failed tasks" in q.gf("queue", "status").stdout
    time.sleep(0.5)
    assert q.job(held)["state"] == "queued"  # waits: a broken GPU does not burn the queue
    assert "cuda:0 quarantined" in q.gf("ls").stdout  # and ls says why
    q.gf("queue", "stop", check=True)
    q.gf("queue", "start", check=True)  # a new dispatcher: quarantine cleared
    assert q.gf("wait", held).returncode == 0


def test_env_and_cwd_options_ls_watch_and_status(queue, tmp_path):
    work = tmp_path / "w d"
    work.mkdir()
    jid = queue.submit("sh", "-c", 'echo "$A|$B|$(pwd)"', opts=["--env", "A=1 2", "--env", "B=x=y", "--cwd", work])
    assert queue.gf("wait", jid).returncode == 0
    assert queue.gf("tail", jid).stdout == f"1 2|x=y|{work}\n"
    r = queue.gf("ls", "--watch", "0.2", "--count", "2", check=True)
    blocks = [b for b in r.stdout.split("Every 0.2s: gpufleet ls") if b.strip()]
    assert len(blocks) == 2 and all(f"{jid}   succeeded" in b for b in blocks) and "\x1b" not in r.stdout
    lines_ = queue.gf("ls", "--watch", "0.2", "--count", "2", "--json", check=True).stdout.splitlines()
    assert len(lines_) == 2 and json.loads(lines_[1])["jobs"][0]["id"] == jid
    status = json.loads(queue.gf("queue", "status", "--json", check=True).stdout)
    assert status["running"] and status["devices"] == ["cuda:0", "cuda:1"] and status["counts"] == {"succeeded": 1}
    pid = status["pid"]
    r = queue.gf("queue", "start", "--slots", "3")
    assert r.returncode == 1 and f"is running (daemon pid {pid}) with its settings" in r.stderr
    assert "already running" in queue.gf("queue", "start", check=True).stdout
    queue.gf("queue", "stop", check=True)
    assert queue.gf("queue", "status").returncode == 3


def test_a_script_keeps_submitting_across_a_daemon_restart(api_queue):
    first = gpufleet.submit(["true"])
    assert first.wait() == 0
    assert api_queue.gf("queue", "stop", check=True).returncode == 0
    api_queue.gf("queue", "start", check=True)  # the script's connection is to the old daemon
    second = gpufleet.submit(["true"])
    assert second.id == first.id + 1 and second.wait() == 0


def test_submit_with_input_sources_queues_a_job_per_input_expanded_as_run_expands_them(queue, tmp_path):
    names = tmp_path / "names"
    names.write_text("b c.tar.gz\nd/e.txt\n")
    script = 'printf "%s|" "$@" > "$0"'
    template = ["sh", "-c", script, "{output}", "{1}", "{2//}", "{2/.}", "{#}"]
    sources = [":::", "x y", "z", "::::", names]
    queued, ran = tmp_path / "queued", tmp_path / "ran"
    queued.mkdir(), ran.mkdir()
    r = queue.gf("submit", "--output", "queued/{#}-{2/.}.txt", "--name", "job {1}", "--", *template, *sources,
                 cwd=tmp_path, check=True)
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) == 4 and ids == list(range(ids[0], ids[0] + 4))  # one job per crossed row, in order
    assert queue.gf("wait", *ids).returncode == 0
    queue.gf("run", "--quiet", "--output", "ran/{#}-{2/.}.txt", "--", *template, *sources, cwd=tmp_path, check=True)
    got = {p.name: p.read_text() for p in queued.iterdir()}
    assert got == {p.name: p.read_text() for p in ran.iterdir()}  # the same commands as `gpufleet run` runs
    assert got["1-b c.tar.txt"].split("|") == ["x y", ".", "b c.tar", "1", ""]
    assert got["4-e.txt"].split("|") == ["z", "d", "e", "4", ""]
    assert [queue.job(j)["name"] for j in ids] == ["job x y", "job x y", "job z", "job z"]
    for argv in (["--output", "o.txt", "--", "cp", "{}", "{output}", ":::", "a", "b"],  # both write o.txt
                 ["--", "echo", "{%}", ":::", "a"], ["--", "echo", "{3}", ":::", "a", ":::", "b"],
                 ["--", "echo", "{}", "::::", tmp_path / "missing", ":::", "a"], ["--", ":::", "a"],
                 ["--", "echo", "{}", ":::", "a", "x{output}.txt"]):  # the queue would fill that {output} in
        r = queue.gf("submit", *argv, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("gpufleet submit: "), (argv, r)
    assert "input 'x{output}.txt' (job 2) contains {output}" in queue.gf("submit", "--", "echo", "{}", ":::", "a",
                                                                      "x{output}.txt", cwd=tmp_path).stderr
    assert "both write 'o.txt'" in queue.gf("submit", "--output", "o.txt", "--", "cp", "{}", "{output}", ":::", "a",
                                            "b", cwd=tmp_path).stderr
    assert sorted(j["id"] for j in queue.ls()) == ids  # the refused submits queued nothing


def test_submit_shell_lines_from_a_file_as_simple_gpu_scheduler_reads_them(queue, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("echo 'a b' > one && echo $CUDA_VISIBLE_DEVICES >> one\nexit 4\n")
    ids = [int(x) for x in queue.gf("submit", "--shell", "--", "{}", "::::", jobs, cwd=tmp_path,
                                    check=True).stdout.split()]
    assert [queue.gf("wait", j).returncode for j in ids] == [0, 4]
    first, gpu = (tmp_path / "one").read_text().splitlines()
    assert first == "a b" and gpu == queue.job(ids[0])["devices"][0][5:]
