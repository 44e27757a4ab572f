"""gpufleet.run with real processes on simulated GPUs: placement, slots, memory-aware admission,
retries, timeouts and the kill sequence, quarantine, exit statuses, atomic outputs, journal/resume,
Ctrl-C (drain, cancel) and SIGKILL of the dispatcher, reports."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import gpufleet

HELPERS = Path(__file__).parent / "dispatch_helpers"
sys.path.insert(0, str(HELPERS))
from proc_utils import alive as _alive, stage_env as _stage_env, wait_for as _wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _intervals(path: Path):
    """Lines 'cvd device slot start end' written by the recording tasks."""
    out = []
    for f in sorted(path.glob("*.rec")):
        cvd, dev, slot, start, end = f.read_text().split()
        out.append((cvd, dev, int(slot), float(start), float(end)))
    return out


RECORD = ('s=$(date +%s.%N); sleep "$1"; e=$(date +%s.%N); '
          'echo "${CUDA_VISIBLE_DEVICES:--} $GPUFLEET_DEVICE $GPUFLEET_SLOT $s $e" > "$2/$GPUFLEET_TASK_ID.rec"')


def _max_overlap(iv):
    points = sorted([(s, 1) for s, _ in iv] + [(e, -1) for _, e in iv], key=lambda p: (p[0], p[1]))
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_each_task_sees_its_gpu_and_slots_are_never_exceeded(sim_gpus, tmp_path):
    sim_gpus(3)
    n = random.randint(13, 19)
    tasks = [gpufleet.Task(["sh", "-c", RECORD, "rec", f"{random.uniform(0.02, 0.12):.3f}", str(tmp_path)])
             for _ in range(n)]
    report = gpufleet.run(tasks, slots_per_device=2, quiet=True)
    assert report.ok and report.succeeded == n
    assert [t.seq for t in report.tasks] == list(range(n))  # input order, whatever order they ended in
    recs = _intervals(tmp_path)
    assert len(recs) == n
    for cvd, dev, slot, _, _ in recs:
        assert dev.startswith("cuda:") and cvd == dev.split(":")[1]  # simulated GPU N -> physical index N
        assert slot in (0, 1)
    for d in range(3):
        iv = [(s, e) for cvd, dev, _, s, e in recs if dev == f"cuda:{d}"]
        assert _max_overlap(iv) <= 2
        for slot in (0, 1):
            assert _max_overlap([(s, e) for cvd, dev, sl, s, e in recs if dev == f"cuda:{d}" and sl == slot]) <= 1
    # every GPU was used (work-conserving shared queue) and the report agrees with the processes
    assert {r[1] for r in recs} == {"cuda:0", "cuda:1", "cuda:2"}
    assert sum(v["tasks"] for v in report.devices.values()) == n


def test_user_cuda_visible_devices_is_never_widened(sim_gpus, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    sim_gpus(4)
    assert gpufleet.device_count() == 2
    tasks = [gpufleet.Task(["sh", "-c", RECORD, "rec", "0.05", str(tmp_path)]) for _ in range(8)]
    assert gpufleet.run(tasks, quiet=True).ok
    seen = {(r[0], r[1]) for r in _intervals(tmp_path)}
    assert seen == {("3", "cuda:0"), ("1", "cuda:1")}


def test_cpu_tasks_see_no_gpu(sim_gpus, tmp_path):
    sim_gpus(2)
    tasks = [gpufleet.Task(["sh", "-c", RECORD, "rec", "0.01", str(tmp_path)], gpus=0) for _ in range(3)]
    assert gpufleet.run(tasks, quiet=True).ok
    assert {r[0] for r in _intervals(tmp_path)} == {"-"}
    assert {r[1] for r in _intervals(tmp_path)} == {"cpu"}


def test_multi_gpu_task_gets_distinct_devices(sim_gpus, tmp_path):
    sim_gpus(3)
    tasks = [gpufleet.Task(["sh", "-c", RECORD, "rec", "0.05", str(tmp_path)], gpus=2) for _ in range(4)]
    report = gpufleet.run(tasks, quiet=True)
    assert report.ok
    for cvd, *_ in _intervals(tmp_path):
        ids = cvd.split(",")
        assert len(ids) == 2 and len(set(ids)) == 2
    bad = gpufleet.run([gpufleet.Task(["true"], gpus=4)], quiet=True)
    assert bad.counts["failed"] == 1 and "needs 4 GPUs but the device pool has 3" in bad.tasks[0].message


def test_memory_aware_admission_waits_for_free_memory(sim_gpus, tmp_path):
    sim_gpus([{"free_memory": "4GiB", "total_memory": "80GiB"}, {"free_memory": "20GiB", "total_memory": "20GiB"}])
    finished = []

    def on_finish(rec):
        finished.append(rec)
        if len(finished) == 4:  # memory frees up on GPU 0 (the simulation models another user leaving)
            gpufleet.update_simulated_gpu(0, free_memory="40GiB")

    tasks = [gpufleet.Task(["sh", "-c", RECORD, "rec", "0.15", str(tmp_path)], min_free_memory="6GiB")
             for _ in range(14)]
    report = gpufleet.run(tasks, slots_per_device=4, quiet=True, on_finish=on_finish, memory_poll=0.05)
    assert report.ok
    recs = _intervals(tmp_path)
    first_gpu0 = min((s for _, d, _, s, _ in recs if d == "cuda:0"), default=None)
    assert first_gpu0 is not None, "GPU 0 never got a task after its memory was freed"
    fourth_end = sorted(r.end for r in finished)[3]
    assert first_gpu0 >= fourth_end - 0.01  # nothing started on GPU 0 while it had 4 GiB free
    # GPU 1: 20 GiB total, 6 GiB per task -> at most 3 at a time although it has 4 slots
    assert _max_overlap([(s, e) for _, d, _, s, e in recs if d == "cuda:1"]) <= 3
    # a need no device can ever meet fails at once with a clear message
    r = gpufleet.run([gpufleet.Task(["true"], min_free_memory="100GiB")], quiet=True)
    assert r.counts["failed"] == 1 and "no device of the pool has that much" in r.tasks[0].message


def test_retries_prefer_another_device_and_budget_is_kept(sim_gpus, tmp_path):
    sim_gpus(2)
    counter = tmp_path / "count"
    script = ('n=$(cat "$1" 2>/dev/null || echo 0); echo $((n+1)) > "$1"; '
              'echo "$GPUFLEET_DEVICE" >> "$1.dev"; [ "$n" -ge 1 ]')
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", script, "t", str(counter)], retries=2)], quiet=True,
                       retry_backoff=0.05)
    assert rep.ok and rep.tasks[0].attempts == 2
    devs = (tmp_path / "count.dev").read_text().split()
    assert len(devs) == 2 and devs[0] != devs[1]
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", "exit 7"], retries=2)], quiet=True, retry_backoff=0.01)
    t = rep.tasks[0]
    assert t.status == "failed" and t.attempts == 3 and t.exit_code == 7 and len(rep.attempts) == 3


def test_exit_codes_and_signals_are_recorded(sim_gpus):
    sim_gpus(1)
    tasks = [gpufleet.Task(["sh", "-c", "exit 3"], name="three"), gpufleet.Task(["sh", "-c", "kill -SEGV $$"], name="segv"),
             gpufleet.Task(["true"], name="ok"), gpufleet.Task(["/no/such/program"], name="missing")]
    rep = gpufleet.run(tasks, quiet=True, quarantine_after=0)
    by = {t.name: t for t in rep.tasks}
    assert by["three"].exit_code == 3 and by["three"].status == "failed"
    assert by["segv"].signal == signal.SIGSEGV and by["segv"].exit_code is None
    assert by["ok"].status == "succeeded" and by["ok"].exit_code == 0
    assert by["missing"].status == "failed" and "/no/such/program" in by["missing"].message
    assert rep.failed == 3 and not rep.ok


def test_timeout_kills_the_whole_group_with_the_kill_sequence(sim_gpus, tmp_path):
    sim_gpus(1)
    pids = tmp_path / "pids"
    # a grandchild in the background, and a process that ignores SIGTERM (needs SIGKILL)
    script = f'sleep 60 & echo $! >> {pids}; sh -c \'trap "" TERM; echo $$ >> {pids}; sleep 60\' & wait'
    t0 = time.monotonic()
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", script], timeout=0.5)], quiet=True, kill_grace=0.5)
    assert time.monotonic() - t0 < 10
    t = rep.tasks[0]
    assert t.status == "timed_out" and "timed out after 0.5 s" in t.message
    listed = [int(p) for p in pids.read_text().split()]
    assert len(listed) == 2
    time.sleep(0.1)
    assert not [p for p in listed if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_quarantine_moves_tasks_off_a_failing_device(sim_gpus, tmp_path):
    sim_gpus(2)
    script = '[ "$CUDA_VISIBLE_DEVICES" != 1 ]'  # GPU 1 is "broken"
    tasks = [gpufleet.Task(["sh", "-c", script], retries=3) for _ in range(9)]
    rep = gpufleet.run(tasks, quiet=True, quarantine_after=2, retry_backoff=0.01)
    assert rep.ok and rep.succeeded == 9
    assert rep.quarantined == ["cuda:1"]
    assert rep.devices["cuda:1"]["failures"] >= 2 and rep.devices["cuda:1"]["quarantined"]
    assert any("quarantined" in m for m in rep.messages)


def test_atomic_outputs_and_skip_existing(sim_gpus, tmp_path):
    sim_gpus(2)
    out = tmp_path / "out"
    write = 'printf "%s" "$1" > "$2"; [ "$1" != bad ]'
    tasks = [gpufleet.Task(["sh", "-c", write, "w", v, "{output}"], outputs=[out / f"{v}.txt"])
             for v in ("a", "bad", "c")]
    rep = gpufleet.run(tasks, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "c.txt"]  # no partial, no temp left
    assert (out / "a.txt").read_text() == "a"
    assert rep.counts == {**rep.counts, "succeeded": 2, "failed": 1}
    # a command that ignores {output} fails clearly instead of being counted done
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", "true"], outputs=[out / "x.txt"])], quiet=True)
    assert rep.tasks[0].status == "failed" and "was not written" in rep.tasks[0].message
    rep = gpufleet.run(tasks, quiet=True, skip_existing=True)
    assert rep.counts["skipped"] == 2 and rep.counts["failed"] == 1


def test_journal_records_every_attempt(sim_gpus, tmp_path):
    sim_gpus(2)
    j = tmp_path / "j.sqlite"
    tasks = [gpufleet.Task(["sh", "-c", f"exit {i % 2}", str(i)], name=f"t{i}") for i in range(6)]
    rep = gpufleet.run(tasks, journal=j, quiet=True, quarantine_after=0)
    con = sqlite3.connect(j)
    rows = dict(con.execute("SELECT name, state FROM tasks").fetchall())
    assert rows == {f"t{i}": ("succeeded" if i % 2 == 0 else "failed") for i in range(6)}
    assert con.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 6
    assert con.execute("SELECT status FROM runs WHERE run_id=?", (rep.run_id,)).fetchone()[0] == "finished"


def test_lazy_input_is_pulled_in_bounded_chunks(sim_gpus, tmp_path):
    sim_gpus(2)
    state = {"yielded": 0, "ahead": 0}

    def gen():
        for i in range(300):
            started = len(os.listdir(tmp_path))  # tasks that really started (each touches a file)
            state["ahead"] = max(state["ahead"], state["yielded"] - started)
            state["yielded"] += 1
            yield gpufleet.Task(["touch", str(tmp_path / str(i))])

    rep = gpufleet.run(gen(), slots_per_device=2, quiet=True)
    assert rep.succeeded == 300
    # the lookahead window, 4 x (GPU + CPU slots) + 16, plus the tasks holding the 4 GPU slots whose
    # command has not touched its file yet (launched on a launcher thread, or not scheduled by the OS yet)
    assert state["ahead"] <= 4 * (4 + 4) + 16 + 4 + 1


def test_bad_arguments_name_the_value(sim_gpus):
    sim_gpus(2)
    with pytest.raises(TypeError, match="shell=True"):
        gpufleet.Task("echo hi")
    with pytest.raises(ValueError, match="cuda:5 is not visible"):
        gpufleet.run([gpufleet.Task(["true"])], devices=[5], quiet=True)
    with pytest.raises(ValueError, match="may not set CUDA_VISIBLE_DEVICES"):
        gpufleet.Task(["true"], env={"CUDA_VISIBLE_DEVICES": "0"})
    with pytest.raises(ValueError, match="slots_per_device must be >= 1"):
        gpufleet.run([], slots_per_device=0)
    with pytest.raises(ValueError, match="resume=True needs a journal"):
        gpufleet.run([], resume=True)
    with pytest.raises(ValueError, match="listed twice"):
        gpufleet.run([], devices=[1, 1], quiet=True)


def test_report_trace_and_timeline(sim_gpus, tmp_path):
    sim_gpus(2)
    rep = gpufleet.run([gpufleet.Task(["sh", "-c", "sleep 0.02; exit $0", str(i % 3 == 0)[0] == "T" and 1 or 0])
                        for i in range(7)] if False else
                       [gpufleet.Task(["sh", "-c", f"sleep 0.02; exit {int(i % 3 == 0)}"]) for i in range(7)],
                       slots_per_device=2, quiet=True, quarantine_after=0)
    trace = json.loads(Path(rep.to_chrome_trace(tmp_path / "t.json")).read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 7 and all(e["dur"] >= 0 for e in spans)
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"} <= {"cuda:0", "cuda:1"}
    png = Path(rep.plot_timeline(tmp_path / "t.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    s = rep.summary()
    assert "7 tasks" in s and "3 failed" in s and "FAILED #1" in s


# ---- real signals on a real dispatcher process ---------------------------------------------------

def _start_dispatcher(tmp_path, *args):
    return subprocess.Popen([sys.executable, str(HELPERS / "run_tasks.py"), *args], env=_stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def test_first_ctrl_c_drains_second_cancels(tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    cmd = f'touch {started}/$I; sleep 1.5; touch {tmp_path}/done$I'
    p = _start_dispatcher(tmp_path, "--n", "8", "--cmd", cmd)
    assert _wait_for(lambda: len(list(started.iterdir())) == 2)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert "draining: 2 running tasks will finish" in out
    assert len(list(tmp_path.glob("done*"))) == 2  # the running ones finished
    assert len(list(started.iterdir())) == 2  # nothing new started
    assert "'not_started': 6" in out and p.returncode == 1

    for f in started.iterdir():
        f.unlink()
    pids = tmp_path / "pids"
    cmd = f'echo $$ >> {pids}; touch {started}/$I; sleep 30; touch {tmp_path}/late$I'
    p = _start_dispatcher(tmp_path, "--n", "8", "--cmd", cmd)
    assert _wait_for(lambda: len(list(started.iterdir())) == 2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert "cancelling: stopping 2 running tasks" in out
    assert "'cancelled': 2" in out and not list(tmp_path.glob("late*"))
    assert _alive([int(x) for x in pids.read_text().split()]) == []


def test_sigkill_of_the_dispatcher_leaves_no_process(tmp_path):
    pids = tmp_path / "pids"
    # each task: a child in its group, a grandchild that escapes with setsid, itself
    cmd = (f'echo $$ >> {pids}; sleep 60 & echo $! >> {pids}; '
           f'setsid sh -c "echo \\$\\$ >> {pids}; exec sleep 60" & sleep 60')
    p = _start_dispatcher(tmp_path, "--n", "6", "--slots", "2", "--cmd", cmd)
    assert _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 12)
    children = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    p.kill()
    p.communicate()
    listed = [int(x) for x in pids.read_text().split()]
    assert _wait_for(lambda: _alive(listed + children) == [], timeout=10), _alive(listed + children)


def test_crash_then_resume_reruns_no_succeeded_task(tmp_path):
    out = tmp_path / "out"
    ran = tmp_path / "ran"
    j = tmp_path / "journal.sqlite"
    # writes part of its output, works, then completes it: a kill leaves a partial temp file
    cmd = (f'echo $I >> {ran}; printf partial > "$2"; '
           f'if [ $I -ge 3 ] && [ -e {tmp_path}/slow ]; then sleep 30; fi; printf "complete $I" > "$2"')
    (tmp_path / "slow").touch()
    args = ["--n", "7", "--slots", "2", "--cmd", cmd, "--outdir", str(out), "--journal", str(j)]
    p = _start_dispatcher(tmp_path, *args)
    assert _wait_for(lambda: ran.exists() and len(ran.read_text().split()) >= 5 and
                     sum(1 for f in out.glob("out*.txt")) >= 3)
    assert list(out.glob(".*.gfpart.txt"))  # killed attempts left partial temporaries
    p.kill()
    p.communicate()
    # only complete files under final names
    for f in out.glob("out*.txt"):
        assert f.read_text().startswith("complete")
    done_before = {int(f.stem[3:]) for f in out.glob("out*.txt")}
    assert done_before >= {0, 1, 2}
    (tmp_path / "slow").unlink()
    p = _start_dispatcher(tmp_path, *args, "--resume")
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 0, text
    runs = [int(x) for x in ran.read_text().split()]
    for i in done_before:
        assert runs.count(i) == 1, (i, runs)  # never re-run
    assert sorted(f.name for f in out.iterdir()) == sorted(f"out{i}.txt" for i in range(7))  # no partial left
    assert all((out / f"out{i}.txt").read_text() == f"complete {i}" for i in range(7))
    assert f"'skipped': {len(done_before)}" in text


def test_ctrl_c_during_a_burst_of_launches_accounts_for_every_task(tmp_path):
    # hundreds of short tasks on 8 slots (the launcher threads are busy), every fifth one long: Ctrl-C
    # twice in the middle of the burst must stop everything, leave no process and count each task once
    pids = tmp_path / "pids"
    cmd = f'echo "$I $$" >> {pids}; if [ $((I % 5)) = 0 ]; then sleep 30; fi'
    for delay in (0.1, 0.3):  # two signals much closer can merge into one (a drain)
        pids.unlink(missing_ok=True)
        p = _start_dispatcher(tmp_path, "--n", "2000", "--gpus", "4", "--slots", "2", "--kill-grace", "0.5",
                              "--cmd", cmd)
        assert _wait_for(lambda: pids.exists() and len(pids.read_text().split()) >= 2 * 30)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 10, out
        assert p.returncode == 1, out
        counts = json.loads(out.split("COUNTS ", 1)[1].strip().replace("'", '"'))
        total = int(out.split(" tasks in ")[0].rsplit(" ", 1)[1])
        assert sum(counts.values()) == total, out
        assert counts["cancelled"] >= 1 and counts["not_started"] >= 1, counts
        rows = [line.split() for line in pids.read_text().splitlines()]
        seqs = [int(i) for i, _ in rows]
        assert len(seqs) == len(set(seqs))  # nothing started twice
        assert len(seqs) <= total - counts["not_started"]  # what started was counted as started
        assert _wait_for(lambda: _alive([int(x) for _, x in rows]) == [], timeout=5), _alive([int(x) for _, x in rows])
