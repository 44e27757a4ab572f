"""Pipeline benchmarks: ours, the baseline, and their ratio, measured in the same run.

1. A four-stage pipeline with known per-stage costs (sleeps and a real OpenCV kernel) against its
   slowest stage run alone: target >= 0.95x.
2. The seed-003 design (Queue(maxsize=36), 8 threads, a new SQLAlchemy session per write, on SQLite)
   against the same work through gpufleet.Pipeline + SqlSink.
3. SqlSink throughput on SQLite (500 rows per transaction): target >= 100,000 rows/s; and one row per
   commit as the baseline.

    PYTHONPATH=build/cuda/stage .venv/bin/python benchmarks/pipeline_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import queue
import sqlite3
import tempfile
import threading
import time

import cv2
import numpy as np

import gpufleet
from gpufleet.sinks import SqlSink


def row(name, ours, base, unit, note=""):
    ratio = ours / base if base else float("nan")
    print(f"{name:<58}{ours:>12.1f}{base:>12.1f} {unit:<8}{ratio:>7.2f}x  {note}")
    return ratio


# ---- 1. four stages with known costs --------------------------------------------------------------
def bench_four_stages(n):
    img = np.random.default_rng(0).random((192, 256), dtype=np.float32)

    def decode(i):  # I/O-like: 2 ms on 2 workers -> 1000 items/s
        time.sleep(0.002)
        return img

    def blur(x):  # a real kernel (OpenCV releases the GIL), 2 workers
        return float(cv2.GaussianBlur(x, (31, 31), 5).mean())

    def infer(x):  # the slowest: 5 ms on 1 worker -> 200 items/s
        time.sleep(0.005)
        return x

    def encode(x):  # 1 ms, 1 worker
        time.sleep(0.001)
        return x

    # The slowest stage alone, serially, on the same number of items.
    t = time.perf_counter()
    for i in range(n):
        infer(i)
    alone = n / (time.perf_counter() - t)
    t = time.perf_counter()
    r = (gpufleet.Pipeline(range(n))
         .map(decode, workers=2).map(blur, workers=2).map(infer, workers=1, name="infer").map(encode)
         .run())
    ours = n / (time.perf_counter() - t)
    ratio = row(f"four stages ({n} items), items/s vs slowest stage alone", ours, alone, "items/s",
                f"limiting: {r.limiting_stage}")
    return ratio, r


# ---- 2. the seed-003 design vs gpufleet ------------------------------------------------------------
def postprocess(depth):
    edges = cv2.Canny(depth, 100, 200)
    return float(cv2.GaussianBlur(edges.astype(np.float32), (71, 71), 7, borderType=cv2.BORDER_REPLICATE).mean())


def make_index(path, n):
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE panoramas (id INTEGER PRIMARY KEY, panorama_sid TEXT, xm_depth_index REAL)")
        c.executemany("INSERT INTO panoramas (id, panorama_sid) VALUES (?, ?)", [(i, f"s{i}") for i in range(n)])


def depth_batches(n, batch, rng):
    depths = rng.integers(0, 255, (16, 96, 128), dtype=np.uint8)
    ids = list(range(n))
    for s in range(0, n, batch):
        time.sleep(0.0005 * batch)  # the "GPU": 0.5 ms per image, batched
        yield [(i, depths[i % 16]) for i in ids[s:s + batch]]


def seed003(path, n, batch):
    from sqlalchemy import Column, Float, Integer, String, create_engine
    from sqlalchemy.orm import declarative_base, sessionmaker

    Base = declarative_base()

    class IndexDatabase(Base):
        __tablename__ = "panoramas"
        id = Column(Integer, primary_key=True)
        panorama_sid = Column(String)
        xm_depth_index = Column(Float)

    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    Session = sessionmaker(bind=engine)
    task_queue: queue.Queue = queue.Queue(maxsize=36)
    errors = []

    def write_to_db(image_id, depth_score):
        session = Session()
        item = session.query(IndexDatabase).filter(IndexDatabase.id == image_id).first()
        try:
            item.xm_depth_index = depth_score
            session.commit()
        except Exception as e:  # the seed prints and goes on
            errors.append(e)
            session.rollback()
        finally:
            session.close()

    def worker():
        while True:
            item = task_queue.get()
            if item is None:
                task_queue.task_done()
                break
            image_id, depth = item
            try:
                write_to_db(image_id, postprocess(depth))
            except Exception as e:
                errors.append(e)
            task_queue.task_done()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for b in depth_batches(n, batch, np.random.default_rng(1)):
        for x in b:
            task_queue.put(x)
    task_queue.join()
    for _ in threads:
        task_queue.put(None)
    for t in threads:
        t.join()
    engine.dispose()
    return errors


def ours003(path, n, batch):
    sink = SqlSink(path, "panoramas", key="id", batch_rows=500, max_delay=0.5)
    # The same items as the seed's GPU loop puts on its queue, one by one.
    def items():
        for b in depth_batches(n, batch, np.random.default_rng(1)):
            yield from b
    r = (gpufleet.Pipeline(items())
         .map(lambda x: {"id": x[0], "xm_depth_index": postprocess(x[1])}, workers=8, name="postprocess")
         .sink(sink, name="sql")
         .run())
    return r


def count_scored(path):
    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM panoramas WHERE xm_depth_index IS NOT NULL").fetchone()[0]


def bench_seed003(n, batch=16):
    d = tempfile.mkdtemp(prefix="gf-bench-")
    a, b = os.path.join(d, "seed.db"), os.path.join(d, "ours.db")
    make_index(a, n)
    make_index(b, n)
    t = time.perf_counter()
    errors = seed003(a, n, batch)
    seed_rate = n / (time.perf_counter() - t)
    t = time.perf_counter()
    r = ours003(b, n, batch)
    ours_rate = n / (time.perf_counter() - t)
    assert count_scored(b) == n, count_scored(b)
    note = f"seed scored {count_scored(a)}/{n} ({len(errors)} errors); ours limiting: {r.limiting_stage}"
    return row(f"seed-003 design vs Pipeline+SqlSink ({n} images, SQLite)", ours_rate, seed_rate, "img/s", note), r


# ---- 3. SqlSink throughput ----------------------------------------------------------------------------
def bench_sqlsink(n):
    d = tempfile.mkdtemp(prefix="gf-bench-")
    rows = [{"id": i, "score": i * 0.5, "label": "img"} for i in range(n)]
    t = time.perf_counter()
    with SqlSink(os.path.join(d, "s.db"), "scores", key="id", batch_rows=500, max_delay=None) as s:
        for r in rows:
            s.write(r)
    ours = n / (time.perf_counter() - t)
    m = min(n, 2000)
    t = time.perf_counter()
    with SqlSink(os.path.join(d, "one.db"), "scores", key="id", batch_rows=1, max_delay=None) as s:
        for r in rows[:m]:
            s.write(r)
    one = m / (time.perf_counter() - t)
    return row(f"SqlSink SQLite, 500 rows/commit vs 1 row/commit ({n} rows)", ours, one, "rows/s",
               f"target >= 100000 rows/s: {'met' if ours >= 100_000 else 'NOT met'}"), ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer items (a smoke run)")
    args = ap.parse_args()
    q = args.quick
    print(f"gpufleet {gpufleet.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"GPUs visible: {gpufleet.device_count()}")
    print(f"{'benchmark':<58}{'ours':>12}{'baseline':>12} {'unit':<8}{'ratio':>8}")
    r1, rep = bench_four_stages(150 if q else 600)
    r2, rep3 = bench_seed003(300 if q else 1500)
    r3, rows_s = bench_sqlsink(50_000 if q else 200_000)
    print()
    print(rep.summary())
    print()
    print(rep3.summary())
    ok = r1 >= 0.95 and rows_s >= 100_000
    print(f"\nfour-stage ratio {r1:.3f} (target >= 0.95): {'met' if r1 >= 0.95 else 'NOT met'}; "
          f"SqlSink {rows_s:,.0f} rows/s (target >= 100,000): {'met' if rows_s >= 100_000 else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
