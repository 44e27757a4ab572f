"""Clean shutdown of a running pipeline on a real Ctrl-C (SIGINT to the process group, as a terminal
sends it) and on a raising stage, in real subprocesses: no hang, no leaked thread or process, and
every result the sink reported committed is in the database."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import gpufleet

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import psutil
    import gpufleet
    from gpufleet.sinks import SqlSink
    import pipeline_helpers


    def source():
        i = 0
        while True:
            yield i
            i += 1


    def row(x):
        return {"id": x[0] if isinstance(x, tuple) else x, "score": float(x[1] if isinstance(x, tuple) else x)}


    def main():
        path, processes, catch = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
        sink = SqlSink(path, "scores", key="id", batch_rows=40, max_delay=0.05)
        p = gpufleet.Pipeline(source(), progress=False)
        if processes:
            p = p.map(pipeline_helpers.square, workers=2, processes=True).map(lambda v: (int(round(v ** 0.5)), v))
        else:
            p = p.map(lambda x: time.sleep(0.002) or x, workers=3)
        p = p.batch(8).map(lambda b: b).unbatch().map(row, workers=2).sink(sink)
        print("started", flush=True)
        if not catch:
            p.run()
        try:
            p.run()
        except KeyboardInterrupt as e:
            rep = e.pipeline_report
            left = [t.name for t in threading.enumerate() if t.name.startswith("gf-")]
            kids = [c for c in psutil.Process().children(recursive=True)
                    if "resource_tracker" not in " ".join(c.cmdline())]
            print(f"interrupted status={rep.status} written={sink.rows_written} threads={left} children={len(kids)}",
                  flush=True)
            sys.exit(130)


    if __name__ == "__main__":  # spawned pool children import this file: run only in the parent
        main()
""")


def _env():
    env = dict(os.environ)
    stage = os.path.dirname(os.path.dirname(gpufleet.__file__))
    env["PYTHONPATH"] = os.pathsep.join([stage, HERE, env.get("PYTHONPATH", "")])
    return env


def _wait_rows(path, proc, minimum=1, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(path, timeout=5) as c:
                if c.execute("SELECT count(*) FROM scores").fetchone()[0] >= minimum:
                    return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise AssertionError("the pipeline wrote nothing")


def _interrupt(proc, path, rows):
    """Waits until the child has committed `rows` rows, sends SIGINT to its process group (what a
    terminal's Ctrl-C does) and returns its output; kills it if it hangs."""
    try:
        assert proc.stdout.readline().strip() == "started"
        _wait_rows(path, proc, minimum=rows)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_ctrl_c_shuts_down_cleanly_and_keeps_committed_rows(tmp_path, processes):
    path = str(tmp_path / "c.db")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    with subprocess.Popen([sys.executable, str(script), path, "1" if processes else "0", "1"], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        out, err = _interrupt(proc, path, 100)
    assert proc.returncode == 130, (out, err)
    line = [x for x in out.splitlines() if x.startswith("interrupted")][0]
    assert "status=interrupted" in line and "threads=[]" in line and "children=0" in line, line
    written = int(line.split("written=")[1].split()[0])
    with sqlite3.connect(path) as c:
        count, distinct = c.execute("SELECT count(*), count(DISTINCT id) FROM scores").fetchone()
        bad = c.execute("SELECT count(*) FROM scores WHERE score != id * 1.0 * (CASE WHEN ? THEN id ELSE 1 END)",
                        (processes,)).fetchone()[0]
    assert count == distinct == written > 0  # every committed row is there, once
    assert bad == 0


def test_uncaught_ctrl_c_exits_without_hanging(tmp_path):
    path = str(tmp_path / "u.db")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    with subprocess.Popen([sys.executable, str(script), path, "0", "0"], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        out, err = _interrupt(proc, path, 1)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err


def test_raising_stage_in_a_subprocess_exits_with_the_error(tmp_path):
    code = textwrap.dedent("""
        import gpufleet
        def bad(x):
            if x == 123:
                raise ZeroDivisionError("stage blew up")
            return x
        gpufleet.Pipeline(iter(range(10**9))).map(bad, workers=4).batch(5).map(len).run()
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "ZeroDivisionError: stage blew up" in r.stderr
    assert "pipeline stage 'map:bad'" in r.stderr
