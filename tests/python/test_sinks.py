"""gpufleet.sinks.SqlSink on real SQLite files: batched keyed upserts, WAL, max_delay, existing
tables, resumed runs without duplicates, the SQLAlchemy path (sqlite+pysqlite URL), bad input."""
from __future__ import annotations

import random
import sqlite3
import threading
import time

import pytest

import gpufleet
from gpufleet import Pipeline
from gpufleet.sinks import SqlSink


def _rows(path, sql="SELECT id, score FROM scores ORDER BY id"):
    with sqlite3.connect(path) as c:
        return c.execute(sql).fetchall()


def test_batched_upserts_never_duplicate(tmp_path):
    rng = random.Random()
    n = rng.randrange(1000, 3000)
    batch = rng.choice([1, 7, 97, 500])
    path = str(tmp_path / "scores.db")
    ids = rng.sample(range(10**6), n)
    with SqlSink(path, "scores", key="id", batch_rows=batch, max_delay=None) as sink:
        for i in ids:
            sink.write({"id": i, "score": i * 0.25, "name": f"img{i}"})
    assert sink.rows_written == n
    assert sink.batches_written == -(-n // batch)
    assert _rows(path) == sorted((i, i * 0.25) for i in ids)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # A re-run over half the ids with new scores updates, never adds.
    again = ids[: n // 2]
    with SqlSink(f"sqlite:///{path}", "scores", key="id", batch_rows=batch) as sink:
        for i in again:
            sink.write({"id": i, "score": -1.0, "name": f"img{i}"})
    got = dict(_rows(path))
    assert len(got) == n
    assert all(got[i] == -1.0 for i in again) and all(got[i] == i * 0.25 for i in ids[n // 2:])


def test_existing_table_keeps_other_columns_seed003_style(tmp_path):
    """Seed 003 writes one score column per face into an existing index table, row by row."""
    path = str(tmp_path / "index.db")
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE panoramas (id INTEGER PRIMARY KEY, panorama_sid TEXT, "
                  "xm_depth_index REAL, xp_depth_index REAL)")
        c.executemany("INSERT INTO panoramas (id, panorama_sid) VALUES (?, ?)", [(i, f"sid{i}") for i in range(50)])
    with SqlSink(path, "panoramas", key="id", batch_rows=16) as sink:
        for i in range(50):
            sink.write({"id": i, "xm_depth_index": i / 10})
        for i in range(0, 50, 2):
            sink.write({"id": i, "xp_depth_index": i / 100})
    rows = _rows(path, "SELECT id, panorama_sid, xm_depth_index, xp_depth_index FROM panoramas ORDER BY id")
    assert rows == [(i, f"sid{i}", i / 10, i / 100 if i % 2 == 0 else None) for i in range(50)]
    with pytest.raises(ValueError, match=r"no column\(s\) \['zm_depth_index'\]"):
        with SqlSink(path, "panoramas", key="id") as sink:
            sink.write({"id": 1, "zm_depth_index": 0.5})


def test_composite_key_and_tuple_rows(tmp_path):
    path = str(tmp_path / "faces.db")
    faces = ["xm", "xp", "zm", "zp"]
    with SqlSink(path, "faces", key=("id", "position"), columns=("id", "position", "score"), batch_rows=5) as s:
        for rep in range(2):
            for i in range(13):
                for f in faces:
                    s.write((i, f, float(i + rep)))
    rows = _rows(path, "SELECT id, position, score FROM faces ORDER BY id, position")
    assert rows == [(i, f, float(i + 1)) for i in range(13) for f in sorted(faces)]
    assert SqlSink(path, "faces", key=("id", "position")).existing_keys() == {(i, f) for i in range(13) for f in faces}


def test_max_delay_commits_a_partial_batch(tmp_path):
    path = str(tmp_path / "d.db")
    sink = SqlSink(path, "scores", key="id", batch_rows=1000, max_delay=0.05).open()
    sink.write({"id": 1, "score": 1.0})
    sink.write({"id": 2, "score": 2.0})
    sink.poll()
    assert _rows(path, "SELECT count(*) FROM sqlite_master WHERE name='scores'") == [(0,)]  # not yet
    time.sleep(0.08)
    sink.poll()
    assert _rows(path) == [(1, 1.0), (2, 2.0)]  # visible to another connection
    sink.write({"id": 3, "score": 3.0})
    sink.close()
    sink.close()
    assert _rows(path)[-1] == (3, 3.0)
    with pytest.raises(ValueError, match="is closed"):
        sink.write({"id": 4, "score": 4.0})


def test_pipeline_sink_and_resume_without_duplicates(tmp_path):
    path = str(tmp_path / "run.db")
    n = 777

    def score(i):
        if i == 500 and not resumed:
            raise RuntimeError("crash mid-run")
        return {"id": i, "score": i / 7}

    resumed = False
    with pytest.raises(RuntimeError, match="crash mid-run") as info:
        Pipeline(range(n)).map(score, workers=3).sink(SqlSink(path, "scores", key="id", batch_rows=64)).run()
    committed = _rows(path)
    assert 0 < len(committed) < n  # the rows that reached the sink were committed on shutdown
    assert info.value.pipeline_report.status == "failed"
    resumed = True
    sink = SqlSink(path, "scores", key="id", batch_rows=64)
    done = sink.existing_keys()
    assert done == {i for i, _ in committed}
    r = Pipeline(i for i in range(n) if i not in done).map(score, workers=3).sink(sink).run()
    assert r.stage("sink:SqlSink").items_out == n - len(done)
    assert _rows(path) == [(i, i / 7) for i in range(n)]


def test_sqlalchemy_path_on_sqlite(tmp_path):
    pytest.importorskip("sqlalchemy")
    path = tmp_path / "sa.db"
    url = f"sqlite+pysqlite:///{path}"
    with SqlSink(url, "scores", key="id", batch_rows=33) as sink:
        assert sink.backend == "sqlalchemy"
        for i in range(100):
            sink.write({"id": i, "score": float(i)})
        for i in range(50):
            sink.write({"id": i, "score": -float(i)})
    assert _rows(str(path)) == [(i, -float(i) if i < 50 else float(i)) for i in range(100)]
    assert SqlSink(url, "scores", key="id").existing_keys() == set(range(100))
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE nokey (id INTEGER, score REAL)")
    with pytest.raises(ValueError, match="no primary key or unique index on \\['id'\\]"):
        SqlSink(url, "nokey", key="id").open()


def test_concurrent_reader_is_not_blocked(tmp_path):
    path = str(tmp_path / "wal.db")
    stop = threading.Event()
    reads = []

    def reader():
        while not stop.is_set():
            try:
                with sqlite3.connect(path, timeout=5) as c:
                    reads.append(c.execute("SELECT count(*) FROM scores").fetchone()[0])
            except sqlite3.OperationalError:  # table not created yet
                pass
            time.sleep(0.001)

    with SqlSink(path, "scores", key="id", batch_rows=50) as sink:
        sink.write({"id": -1, "score": 0.0})
        sink.flush()
        t = threading.Thread(target=reader)
        t.start()
        for i in range(5000):
            sink.write({"id": i, "score": float(i)})
    stop.set()
    t.join()
    assert reads and all(r % 50 in (1,) or r == 5001 for r in reads)  # whole batches only
    assert reads == sorted(reads)


def _write_and_close(sink, row):
    sink.write(row)
    sink.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: SqlSink(p, "bad table", key="id"), "table must be an identifier"),
    (lambda p: SqlSink(p, "t", key=[]), "key must name at least one column"),
    (lambda p: SqlSink(p, "t", key="id", batch_rows=0), "batch_rows must be an int >= 1, got 0"),
    (lambda p: SqlSink(p, "t", key="id", columns=("x",)), "must include the key columns"),
    (lambda p: SqlSink(p, "t", key="id").write({"score": 1}), "lacks the key column"),
    (lambda p: SqlSink(p, "t", key="id").write((1, 2)), "rows are dicts"),
    (lambda p: SqlSink(p, "t", key="id").write({"id; DROP": 1}), "must be identifiers"),
    (lambda p: _write_and_close(SqlSink(p, "t", key="id", create=False), {"id": 1}),
     "does not exist and create=False"),
])
def test_bad_input_is_named(tmp_path, make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make(str(tmp_path / "x.db"))


def test_numpy_scalars_are_written_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "np.db")
    with SqlSink(path, "scores", key="id") as sink:
        sink.write({"id": np.int64(3), "score": np.float32(0.5)})
    assert _rows(path) == [(3, 0.5)]
    assert _rows(path, "SELECT typeof(id), typeof(score) FROM scores") == [("integer", "real")]
