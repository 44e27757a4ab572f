"""gpufleet.Pipeline: ordering, backpressure, batching, device stages, error policies, statistics that
add up, process stages, reports (summary, Chrome trace, plot)."""
from __future__ import annotations

import json
import os
import random
import threading
import time

import numpy as np
import psutil
import pytest

import gpufleet
import pipeline_helpers as helpers
from gpufleet import Pipeline


def _no_pipeline_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("gf-")]


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    yield
    assert _no_pipeline_threads() == []


def _jitter(x, rng_seed):
    time.sleep(random.Random(rng_seed * 1_000_003 + x).random() * 0.002)
    return x


@pytest.mark.parametrize("ordered", [True, False])
def test_map_chain_results_and_order(ordered):
    rng = random.Random()
    n = rng.randrange(50, 400)
    workers = rng.randrange(2, 7)
    seed = rng.randrange(1 << 30)
    items = [rng.randrange(-1000, 1000) for _ in range(n)]
    r = (Pipeline(items, ordered=ordered)
         .map(lambda x: _jitter(x, seed), workers=workers)
         .map(lambda x: 3 * x + 1, workers=rng.randrange(1, 4))
         .run())
    expected = [3 * x + 1 for x in items]
    assert r.status == "completed"
    if ordered:
        assert r.results == expected
    else:
        assert sorted(r.results) == sorted(expected)
    assert r.items == n
    assert [s.name for s in r.stages] == ["source", "map:<lambda>", "map:<lambda>#2"]
    assert all(s.items_out == n for s in r.stages)


def test_ordered_across_batches_unbatch_and_skipped_items():
    rng = random.Random()
    n = rng.randrange(100, 300)
    size = rng.choice([3, 5, 7, 11])
    bad = set(rng.sample(range(n), 9))

    def check(x):
        if x in bad:
            raise ValueError(f"bad {x}")
        return _jitter(x, 1)

    r = (Pipeline(range(n), ordered=True, on_error="skip")
         .map(check, workers=4)
         .batch(size, max_delay=0.005, collate=np.array)
         .gpu(lambda b: b * 2, devices="cpu", replicas_per_device=3)
         .unbatch()
         .map(lambda x: int(x) + 1, workers=3)
         .run())
    assert r.results == [2 * x + 1 for x in range(n) if x not in bad]
    assert sorted(e.index for e in r.errors) == sorted(bad)
    assert all(e.stage == "map:check" and isinstance(e.error, ValueError) and e.item is None for e in r.errors)
    gpu = r.stage("gpu:<lambda>")
    assert gpu.items_out == n - len(bad)
    assert gpu.batches >= (n - len(bad)) / size
    assert 1 <= gpu.mean_batch_size <= size
    assert gpu.workers == 3


def test_backpressure_bounds_the_source():
    """The source never runs further ahead of the sink than the queues and the workers can hold."""
    produced = [0]
    ahead = []

    def source():
        for i in range(120):
            produced[0] += 1
            yield i

    def slow_sink(x):
        ahead.append(produced[0] - len(ahead))
        time.sleep(0.002)

    p = Pipeline(source(), queue_size=3).map(lambda x: x, workers=2).sink(slow_sink)
    r = p.run()
    assert r.stage("sink:slow_sink").items_out == 120
    # 3 + 3 queued, 2 in the map workers, 1 in the sink, 1 held by the source while it blocks.
    bound = sum(q.capacity for q in r.queues) + 2 + 1 + 1
    assert max(ahead) <= bound
    assert max(ahead) >= bound - 3  # it did fill up: the sink is the slow one
    assert all(q.high_water <= q.capacity for q in r.queues)
    assert r.limiting_stage == "sink:slow_sink"
    # Queue depth over time never exceeds the capacity either.
    for q in r.queues:
        assert max(r.timeline["queues"][q.name]) <= q.capacity


def test_stats_add_up_and_name_the_slowest_stage():
    n = 40
    r = (Pipeline(range(n))
         .map(lambda x: time.sleep(0.001) or x, workers=2)
         .map(lambda x: time.sleep(0.008) or x, workers=1, name="slow")
         .map(lambda x: x, workers=3)
         .run())
    for s in r.stages:
        assert s.busy_s + s.starved_s + s.blocked_s == pytest.approx(s.wall_s, rel=1e-9, abs=1e-6)
        for w in s.workers_detail:
            assert w["busy_s"] + w["starved_s"] + w["blocked_s"] == pytest.approx(w["wall_s"], abs=1e-6)
    slow = r.stage("slow")
    assert slow.busy_s >= n * 0.008
    assert r.limiting_stage == "slow"
    # Upstream of the slow stage waits on its queue, downstream starves.
    assert r.stage("map:<lambda>").blocked_s > r.stage("map:<lambda>").starved_s
    assert r.stage("map:<lambda>#2").starved_s > 0.8 * r.stage("map:<lambda>#2").wall_s
    text = r.summary()
    assert "limiting stage: slow" in text and "<- limiting" in text


def test_batch_max_delay_flushes_partial_batches():
    def source():
        for i in range(10):
            yield i
            if i == 3:
                time.sleep(0.4)  # much longer than max_delay: the first 4 items go out as a batch

    sizes = []
    r = (Pipeline(source())
         .batch(8, max_delay=0.1)
         .map(lambda b: sizes.append(len(b)) or b)
         .run())
    assert sizes[0] == 4
    assert sum(sizes) == 10
    assert [x for b in r.results for x in b] == list(range(10))
    assert r.stage("batch:8").batches == len(sizes)


def test_batch_without_delay_waits_for_full_batches():
    n = 23
    r = Pipeline(range(n)).batch(5).map(len).run()
    assert r.results == [5, 5, 5, 5, 3]


def test_gpu_stage_factory_once_per_replica_on_simulated_gpus(sim_gpus):
    sim_gpus(3)
    calls = []
    lock = threading.Lock()

    def load_model(device):
        with lock:
            calls.append((str(device), threading.current_thread().name))
        offset = 1000 * (device.index + 1)
        return lambda batch: [(offset, x) for x in batch]

    n = 101
    r = (Pipeline(range(n), ordered=True)
         .batch(4)
         .gpu(load_model, replicas_per_device=2)
         .unbatch()
         .run())
    assert sorted(d for d, _ in calls) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda:2"]
    assert len({t for _, t in calls}) == 6  # each replica in its own thread
    assert [x for _, x in r.results] == list(range(n))
    assert {o for o, _ in r.results} <= {1000, 2000, 3000}
    st = r.stage("gpu:load_model")
    assert st.workers == 6
    assert [str(d) for d in st.devices] == ["cuda:0", "cuda:1", "cuda:2"]
    assert st.note == "simulated GPUs"


def test_gpu_stage_without_gpus_runs_on_cpu_and_says_so():
    if gpufleet.device_count() > 0:
        pytest.skip("this machine has a GPU")
    seen = []
    r = Pipeline(range(5)).batch(2).gpu(lambda device: (seen.append(device) or (lambda b: b))).unbatch().run()
    assert seen == [gpufleet.Device("cpu")]
    assert sorted(r.results) == list(range(5))
    assert "ran on the CPU" in r.stage("gpu:<lambda>").note
    assert "ran on the CPU" in r.summary()


def test_factory_failure_fails_the_run_cleanly():
    def broken(device):
        raise RuntimeError("no weights")

    with pytest.raises(RuntimeError, match="no weights") as info:
        Pipeline(range(1000)).batch(4).gpu(broken, devices=["cpu", "cpu"]).unbatch().run()
    assert info.value.pipeline_report.status == "failed"


def test_unbatch_length_mismatch_is_an_item_error():
    r = (Pipeline(range(6), on_error="collect")
         .batch(3)
         .map(lambda b: b[:2] if b[0] == 0 else b)
         .unbatch()
         .run())
    assert sorted(r.results) == [3, 4, 5]
    assert [e.index for e in r.errors] == [0, 1, 2]
    assert "one output per input" in str(r.errors[0].error)


def test_on_error_raise_stops_everything_and_reraises():
    started = []

    def source():
        for i in range(10**9):
            started.append(i)
            yield i

    def boom(x):
        if x == 37:
            raise KeyError("item 37 is cursed")
        return x

    with pytest.raises(KeyError, match="cursed") as info:
        Pipeline(source()).map(boom, workers=3).map(lambda x: x, workers=2).run()
    rep = info.value.pipeline_report
    assert rep.status == "failed"
    assert [(e.stage, e.index) for e in rep.errors] == [("map:boom", 37)]
    assert len(started) < 1000  # the source stopped: bounded by the queues
    assert any("pipeline stage 'map:boom'" in n for n in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("policy", ["skip", "collect"])
def test_skip_and_collect_record_ids_and_go_on(policy):
    rng = random.Random()
    n = rng.randrange(60, 200)
    items = [{"name": f"img{i:04d}", "value": i} for i in range(n)]
    r = (Pipeline(items, on_error=policy, id=lambda it: it["name"])
         .map(lambda it: it["value"], workers=2)
         .map(helpers.fail_on_seven, workers=3)
         .run())
    failing = [i for i in range(n) if i % 7 == 0]
    assert sorted(r.results) == [i for i in range(n) if i % 7]
    assert [e.id for e in r.errors] == [f"img{i:04d}" for i in failing]
    assert [e.index for e in r.errors] == failing
    assert all("ValueError" in e.traceback for e in r.errors)
    if policy == "collect":
        assert [e.item for e in r.errors] == failing
    else:
        assert all(e.item is None for e in r.errors)
    assert r.stage("map:fail_on_seven").errors == len(failing)


def test_source_exception_fails_the_run():
    def source():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        Pipeline(source()).map(lambda x: x, workers=2).run()


def test_sink_object_protocol_and_ordered_writes():
    class Recorder:
        max_delay = 0.01

        def __init__(self):
            self.events = []

        def open(self):
            self.events.append("open")

        def write(self, item):
            self.events.append(item)

        def poll(self):
            self.events.append("poll")

        def close(self):
            self.events.append("close")

    def source():
        for i in range(20):
            if i == 10:
                time.sleep(0.08)
            yield i

    rec = Recorder()
    r = Pipeline(source(), ordered=True).map(lambda x: _jitter(x, 5), workers=4).sink(rec).run()
    assert r.results is None
    assert rec.events[0] == "open" and rec.events[-1] == "close"
    assert [e for e in rec.events if isinstance(e, int)] == list(range(20))
    assert "poll" in rec.events  # idle for longer than max_delay
    assert r.stage("sink:Recorder").items_out == 20


def _children(me):
    """Child processes, less multiprocessing's resource tracker (one per interpreter, by design)."""
    out = set()
    for c in me.children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_process_stage_runs_in_spawned_children_and_cleans_up():
    me = psutil.Process()
    before = _children(me)
    n = 37
    r = Pipeline(range(n), ordered=True).map(helpers.pid_and_square, workers=2, processes=True).run()
    assert [sq for _, sq in r.results] == [i * i for i in range(n)]
    pids = {pid for pid, _ in r.results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert "spawned processes" in r.stage("map:pid_and_square").note
    deadline = time.monotonic() + 10
    while _children(me) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children(me) - before == set()


def test_process_stage_errors_follow_the_policy():
    r = Pipeline(range(30), on_error="skip").map(helpers.fail_on_seven, workers=2, processes=True).run()
    assert sorted(r.results) == [i for i in range(30) if i % 7]
    assert [e.index for e in r.errors] == [0, 7, 14, 21, 28]


def test_chrome_trace_and_plot(tmp_path):
    r = (Pipeline(range(50)).map(lambda x: time.sleep(0.001) or x, workers=2).batch(4).map(len).run())
    path = tmp_path / "trace.json"
    trace = r.to_chrome_trace(str(path))
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(trace))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} <= {"busy", "starved", "blocked"}
    assert any(e["name"] == "busy" for e in spans)
    # Per worker the spans tile its timeline: their total is its wall time.
    st = r.stage("map:<lambda>")
    for w, detail in enumerate(st.workers_detail):
        pid = [s.name for s in r.stages].index(st.name)
        total = sum(e["dur"] for e in spans if e["pid"] == pid and e["tid"] == w) / 1e6
        assert total == pytest.approx(detail["wall_s"], abs=1e-5)
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert counters
    png = tmp_path / "run.png"
    assert r.plot(str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_in_a_pipe_is_plain_lines(capsys, monkeypatch):
    # Captured stderr is not a terminal: plain blocks every interval (Note [Progress modes]), each a line
    # of the items done and a line per stage with the limiting one tagged, never an escape code.
    monkeypatch.setenv("GPUFLEET_PROGRESS_INTERVAL", "0.1")
    r = Pipeline(range(30), progress=True, name="demo").map(lambda x: time.sleep(0.01) or x, workers=1).run()
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    lines = err.splitlines()
    assert lines[-3].startswith("demo: 30/30 item (100%)"), lines
    assert lines[-2].startswith("  source: 30 out")
    assert lines[-1].startswith("  map:<lambda> [limiting]: 30 out, busy") and "queue 0/4" in lines[-1]
    assert len(lines) > 3  # blocks while it ran, not only the last one
    assert len(r.results) == 30


@pytest.mark.parametrize("build, message", [
    (lambda: Pipeline(42), "source must be an iterable"),
    (lambda: Pipeline([], on_error="ignore"), "on_error must be one of"),
    (lambda: Pipeline([]).map(3), "map\\(\\) takes a callable"),
    (lambda: Pipeline([]).map(abs, workers=0), "workers must be >= 1, got 0"),
    (lambda: Pipeline([]).batch(0), "size must be >= 1, got 0"),
    (lambda: Pipeline([]).batch(2, max_delay=-1), "max_delay must be None or a non-negative"),
    (lambda: Pipeline([]).batch(2).batch(3), "batch\\(\\) after batch\\(\\)"),
    (lambda: Pipeline([]).unbatch(), "unbatch\\(\\) without a batch"),
    (lambda: Pipeline([]).sink(print).map(abs), "after .sink\\(\\)"),
    (lambda: Pipeline([]).gpu(abs, devices=[]), "devices is an empty list"),
    (lambda: Pipeline([]).gpu(abs, devices="gpu:0"), "gpu:0"),
    (lambda: Pipeline([], queue_size=0), "queue_size must be >= 1, got 0"),
])
def test_bad_arguments_name_the_value(build, message):
    with pytest.raises((TypeError, ValueError), match=message):
        build()


def test_core_queue_close_cancel_from_python():
    q = gpufleet._core.pipeline.Queue(2)
    q.put("a")
    q.put("b")
    with pytest.raises(TimeoutError):
        q.put("c", timeout=0.01)
    q.close()
    with pytest.raises(gpufleet._core.pipeline.QueueClosed):
        q.put("c")
    assert q.get() == "a" and q.get() == "b"
    with pytest.raises(gpufleet._core.pipeline.QueueClosed):
        q.get()
    q2 = gpufleet._core.pipeline.Queue(1)
    got = []
    t = threading.Thread(target=lambda: got.append(pytest.raises(gpufleet._core.pipeline.QueueCancelled, q2.get)))
    t.start()
    time.sleep(0.02)
    q2.cancel()
    t.join(5)
    assert not t.is_alive() and got
    with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
        gpufleet._core.pipeline.Queue(0)


@pytest.mark.skipif(not hasattr(gpufleet.kernels, "gaussian_blur"), reason="gpufleet.kernels.gaussian_blur not built")
def test_gpufleet_kernel_as_a_stage_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng()
    imgs = [rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40))), dtype=np.float32) for _ in range(23)]
    r = (Pipeline(imgs, ordered=True)
         .map(lambda x: gpufleet.kernels.gaussian_blur(x, 7, 1.5), workers=3)
         .map(np.asarray)
         .run())
    for got, img in zip(r.results, imgs):
        want = cv2.GaussianBlur(img, (7, 7), 1.5, borderType=cv2.BORDER_REPLICATE)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


_HAS_TENSOR = hasattr(gpufleet, "Tensor") and hasattr(gpufleet, "from_numpy")


@pytest.mark.skipif(not _HAS_TENSOR, reason="gpufleet.Tensor not built")
def test_to_device_hands_gpufleet_tensors_to_the_stage_on_cpu():
    rng = np.random.default_rng()
    n, size = int(rng.integers(20, 60)), int(rng.integers(2, 6))
    data = [rng.random((3, 5), dtype=np.float32) for _ in range(n)]
    seen = []

    def model(device):
        def run(batch):
            seen.append((type(batch), str(batch.device)))
            return np.asarray(batch) * 2  # a host view of the CPU tensor
        return run

    r = (Pipeline(data, ordered=True)
         .batch(size, collate=np.stack)
         .gpu(model, devices="cpu", to_device=True)
         .unbatch()
         .run())
    assert all(t is gpufleet.Tensor and d == "cpu" for t, d in seen)
    for got, x in zip(r.results, data):
        np.testing.assert_array_equal(got, x * 2)


@pytest.mark.skipif(not _HAS_TENSOR or gpufleet.build_info()["cuda"] is False
                    or gpufleet.topology().source in ("none", "simulated"), reason="needs a CUDA device")
def test_to_device_stages_batches_onto_each_gpu():
    rng = np.random.default_rng()
    data = [rng.random((7, 3), dtype=np.float32) for _ in range(41)]
    seen = set()

    def model(device):
        def run(batch):
            seen.add(str(batch.device))
            assert str(batch.device) == str(device)
            return batch.cpu().numpy() + 1
        return run

    r = (Pipeline(data, ordered=True).batch(4, collate=np.stack)
         .gpu(model, to_device=True, replicas_per_device=2).unbatch().run())
    assert seen == {f"cuda:{i}" for i in range(gpufleet.device_count())}
    for got, x in zip(r.results, data):
        np.testing.assert_array_equal(got, x + 1)


def test_gpu_samples_are_recorded_during_the_run(sim_gpus):
    sim_gpus([{"utilization": 37, "total_memory": "80GiB", "free_memory": "30GiB"}, {"utilization": 5}])

    def model(device):
        def run(batch):
            time.sleep(0.01)
            return batch
        return run

    r = Pipeline(range(40)).batch(4).gpu(model, devices=[0]).unbatch().run()
    assert r.gpu_samples, "no GPU samples"
    assert {s["device"] for s in r.gpu_samples} == {"cuda:0"}  # only the stage's devices
    assert all(s["utilization"] == 37 and s["used_memory"] == 50 * 2**30 for s in r.gpu_samples)
    assert all(s["source"] == "simulated" for s in r.gpu_samples)
    assert "GPU cuda:0 (simulated): utilisation 37% mean" in r.summary()


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_report_counts_the_process_cpu():
    # Note [Saturated CPU]: CPU burnt in the stages is in cpu_s; time asleep is not.
    busy = Pipeline(range(4)).map(lambda x: _burn(0.05) or x, workers=2).run()
    assert busy.cpu_s >= 0.2 * 0.9, busy.cpu_s
    idle = Pipeline(range(4)).map(lambda x: time.sleep(0.05) or x, workers=1).run()
    assert idle.cpu_s < 0.1 and idle.wall_s >= 0.2 and idle.cpu_utilization < 0.5
    # not saturated by this process: only by others, when they keep the machine's cores busy
    assert "process CPU" in idle.summary()
    assert ("saturated" in idle.summary()) == (idle.machine_busy is not None and idle.machine_busy >= 0.9)


def test_saturated_cpu_is_said_in_the_summary():
    from gpufleet._pipeline import PipelineReport

    def report(cpu_s):
        return PipelineReport(stages=[], queues=[], wall_s=1.0, limiting_stage="source", errors=[], results=[],
                              timeline={}, gpu_samples=[], status="completed", trace_stats=[], t0_ns=0,
                              cpu_s=cpu_s, cores=2)

    assert "process CPU 1.90 of 2 cores (saturated" in report(1.9).summary()
    assert "process CPU 1.00 of 2 cores\n" in report(1.0).summary() + "\n"
    assert "saturated" in report(1.9)._repr_html_()
    busy_machine = report(0.5)
    busy_machine.machine_busy = 0.97  # other processes hold the cores
    assert "process CPU 0.50 of 2 cores, machine CPUs 97% busy (saturated" in busy_machine.summary()


def test_machine_cpu_is_read_from_proc_stat():
    from gpufleet._pipeline import _machine_cpu

    r = Pipeline(range(4)).map(lambda x: _burn(0.05) or x).run()
    if _machine_cpu() is None:  # pragma: no cover - not Linux
        assert r.machine_busy is None
    else:
        # at least this process's own share of the machine was busy
        assert r.machine_busy is not None and r.cpu_s / (r.wall_s * os.cpu_count()) * 0.8 <= r.machine_busy <= 1.0
