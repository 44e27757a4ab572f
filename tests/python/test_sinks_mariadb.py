"""SqlSink against a real MariaDB server (the user's MySQL), started privately on loopback:
keyed upserts, a resumed run, server-side KILLs of the writer's connection mid-run and a restart of
the server mid-run (no row lost, none duplicated)."""
from __future__ import annotations

import threading
import time

import pytest

from gpufleet import Pipeline
from gpufleet.sinks import SqlSink
from pipeline_helpers.mariadb import mariadb, restart_mariadb  # noqa: F401  (fixture)

pytest.importorskip("sqlalchemy")


def _count(db, table):
    conn = db.admin()
    try:
        with conn.cursor() as c:
            c.execute(f"SELECT count(*), count(DISTINCT id), coalesce(sum(score), 0) FROM {table}")
            return c.fetchone()
    finally:
        conn.close()


def _kill_writer(db, wait: float = 10.0) -> int:
    """KILLs every connection of the test user (the sink's), server side, waiting up to `wait`
    seconds for one to exist (the sink may be between connections). Returns how many it killed."""
    conn = db.admin()
    killed = 0
    deadline = time.monotonic() + wait
    try:
        with conn.cursor() as c:
            while killed == 0 and time.monotonic() < deadline:
                c.execute("SELECT id FROM information_schema.processlist WHERE user = %s", (db.user,))
                for (cid,) in c.fetchall():
                    try:
                        c.execute(f"KILL CONNECTION {int(cid)}")
                        killed += 1
                    except Exception:  # it ended by itself meanwhile
                        pass
                if killed == 0:
                    time.sleep(0.005)
    finally:
        conn.close()
    return killed


def test_upserts_and_resume(mariadb):  # noqa: F811
    n = 1237
    with SqlSink(mariadb.url, "resume_scores", key="id", batch_rows=200) as sink:
        assert sink.backend == "sqlalchemy"
        for i in range(n):
            sink.write({"id": i, "score": float(i), "label": f"img{i}"})
    assert _count(mariadb, "resume_scores") == (n, n, pytest.approx(sum(range(n))))
    # Resume: existing keys are skipped; a re-write of some rows updates them in place.
    sink = SqlSink(mariadb.url, "resume_scores", key="id", batch_rows=200)
    assert sink.existing_keys() == set(range(n))
    r = (Pipeline(range(n + 100))
         .map(lambda i: {"id": i, "score": 2.0 * i, "label": f"img{i}"}, workers=2)
         .sink(sink)
         .run())
    assert r.stage("sink:SqlSink").items_out == n + 100
    assert _count(mariadb, "resume_scores") == (n + 100, n + 100, pytest.approx(2.0 * sum(range(n + 100))))


def _pipeline_while(sink, n, score, disrupt, row_delay):
    """Writes rows {id: i, score: i * score} for i < n through a 4-worker pipeline into `sink` while
    `disrupt(stop)` runs in a thread (it watches sink.rows_written to strike mid-run); returns the
    pipeline's report."""
    stop = threading.Event()

    def make_row(i):
        time.sleep(row_delay)
        return {"id": i, "score": i * score}

    t = threading.Thread(target=disrupt, args=(stop,))
    t.start()
    try:
        return Pipeline(range(n)).map(make_row, workers=4).sink(sink).run()
    finally:
        stop.set()
        t.join()


def _wait_rows(sink, rows, stop) -> bool:
    while sink.rows_written < rows and not stop.is_set():
        time.sleep(0.002)
    return not stop.is_set()


def test_server_side_kill_mid_run_loses_and_duplicates_nothing(mariadb):  # noqa: F811
    n = 3000
    sink = SqlSink(mariadb.url, "killed_scores", key="id", batch_rows=100, max_delay=None, retries=8,
                   retry_wait=0.05)
    kills = []

    def killer(stop):
        # Kill the writer's connection three times, at different points of the run.
        for threshold in (400, 1300, 2200):
            if not _wait_rows(sink, threshold, stop):
                return
            kills.append(_kill_writer(mariadb))

    r = _pipeline_while(sink, n, 0.5, killer, 0.0002)
    assert len(kills) == 3 and all(k >= 1 for k in kills)
    assert sink.batches_retried >= 1  # the kills hit: the sink reconnected and retried whole batches
    assert r.errors == []
    assert sink.rows_written == n
    assert _count(mariadb, "killed_scores") == (n, n, pytest.approx(0.5 * sum(range(n))))


def test_without_retries_the_kill_is_an_error(mariadb):  # noqa: F811
    """The control: with retries=0 the same KILL fails the run (so the test above does test retries)."""
    import sqlalchemy as sa

    sink = SqlSink(mariadb.url, "no_retry_scores", key="id", batch_rows=50, max_delay=None, retries=0)
    with sink:
        sink.write_many({"id": i, "score": 1.0} for i in range(100))
        sink.flush()
        assert _kill_writer(mariadb) >= 1
        with pytest.raises(sa.exc.DBAPIError) as info:
            sink.write_many({"id": i, "score": 2.0} for i in range(100, 150))
        assert info.value.connection_invalidated
        assert _count(mariadb, "no_retry_scores")[0] == 100
    # The failed rows stayed buffered; close() wrote them on a fresh connection.
    assert _count(mariadb, "no_retry_scores") == (150, 150, pytest.approx(100 * 1.0 + 50 * 2.0))


def test_server_restart_mid_run_is_retried_until_it_is_back(mariadb):  # noqa: F811
    """Issue 12, item 8: during a restart the reconnect is refused (not a dropped connection): with
    retries the sink waits for the server instead of failing the pipeline. Last in this module: the
    server restarts."""
    n = 3000
    sink = SqlSink(mariadb.url, "restart_scores", key="id", batch_rows=100, max_delay=None, retries=8,
                   retry_wait=0.2)
    restarted = []

    def restarter(stop):
        if _wait_rows(sink, 900, stop):
            restart_mariadb(mariadb, down_for=1.5)
            restarted.append(time.monotonic())

    r = _pipeline_while(sink, n, 0.25, restarter, 0.0005)
    assert restarted and sink.batches_retried >= 1
    assert r.errors == []
    assert sink.rows_written == n
    assert _count(mariadb, "restart_scores") == (n, n, pytest.approx(0.25 * sum(range(n))))
