"""A typed tour of the public API, checked by mypy in `make test` (`make typecheck`) against the
package and its generated stubs (Note [Stubs] in scripts/stubs.sh). Never run, only type-checked.

Each annotated assignment says what a user's editor should infer. The lines with
``# type: ignore[...]`` are deliberate mistakes: with ``warn_unused_ignores`` mypy fails if one of
them stops being an error, i.e. if a signature decays to ``Any`` (a stub lost, a type erased).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

import gpufleet
from gpufleet import kernels as K
from gpufleet.sinks import SqlSink

# ---- devices --------------------------------------------------------------------------------------------
n: int = gpufleet.device_count()
ok: bool = gpufleet.is_available()
devs: list[gpufleet.DeviceInfo] = gpufleet.devices()
for d in devs:
    ordinal: int = d.ordinal
    free: Optional[int] = d.free_memory
    name: str = d.name
topo: gpufleet.Topology = gpufleet.topology()
source: str = topo.source
chosen: list[gpufleet.Device] = gpufleet.select_devices(1, min_free_memory="20GiB", max_utilization=50)
dev = gpufleet.Device("cuda:1")
index: Optional[int] = dev.index
with gpufleet.simulate_gpus([{"free_memory": "6GiB"}, {}]):
    pass
visible: list[int] = gpufleet.parse_visible_devices("0,2", 4)
size: int = gpufleet.parse_memory_size("4GiB")
seed: int = gpufleet.seed_everything(0)
gpufleet.device_count() + "cuda"  # type: ignore[operator]
gpufleet.parse_memory_size(4.5)  # type: ignore[arg-type]

# ---- tensors --------------------------------------------------------------------------------------------
a = np.arange(6, dtype=np.float32).reshape(2, 3)
t: gpufleet.Tensor = gpufleet.from_numpy(a)
h: gpufleet.Tensor = t.to(gpufleet.float16)
back: np.ndarray = t.numpy()
parts: list[gpufleet.Tensor] = gpufleet.scatter(gpufleet.zeros(5, 3), ["cpu"] * 4)
whole: gpufleet.Tensor = gpufleet.gather(parts, "cpu")
sd = gpufleet.strip_prefix({"module.w": 1}, "module.")
t.to(non_blocking="yes")  # type: ignore[arg-type]

# ---- dispatcher -----------------------------------------------------------------------------------------
tasks = gpufleet.product(["cp", "{1}", "{output}"], ["a.txt"], output="out/{1/.}.bak")
report: gpufleet.RunReport = gpufleet.run(tasks, slots_per_device=2, journal="run.sqlite", resume=True)
summary: str = report.summary()
failed: list[gpufleet.TaskRecord] = report.failed_tasks
trace_path: str = report.to_chrome_trace("trace.json")
html: str = report._repr_html_()
report.plot_timeline("timeline.png")
task = gpufleet.Task(["echo", "hi"], timeout=10, retries=1)
gpufleet.run([task], slots_per_device="2")  # type: ignore[arg-type]

# ---- queue ----------------------------------------------------------------------------------------------
job: gpufleet.Job = gpufleet.submit(["python", "train.py"], min_free_memory="20GiB", after=[gpufleet.Job(3)])
job_state: str = job.status
job_status: int = job.wait(timeout=60.0)
job_exit: Optional[int] = job.exit_status
job_log: str = job.log
job.wait(timeout="soon")  # type: ignore[arg-type]

# ---- executor and spawn ---------------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


with gpufleet.GPUExecutor(slots_per_device=1) as ex:
    fut = ex.submit(square, 3)
    results = list(ex.map(square, range(10)))

# ---- kernels --------------------------------------------------------------------------------------------
depth = np.zeros((2, 64, 64), np.uint8)
r: K.KMeansResult = K.kmeans1d(depth[0], 4)
K.set_num_threads(2)
threads: int = K.get_num_threads()
scores = K.congestion_score(depth)
edges = K.canny(depth[0], 100, 200)
K.set_num_threads("two")  # type: ignore[arg-type]

# ---- pipelines and sinks --------------------------------------------------------------------------------
p: gpufleet.Pipeline = (gpufleet.Pipeline(range(10), ordered=True, on_error="collect")
                        .map(lambda i: np.full((4, 4), i, np.float32), workers=2)
                        .batch(4, collate=np.stack)
                        .gpu(lambda device: (lambda b: b.mean(axis=(1, 2))))
                        .unbatch()
                        .sink(SqlSink("scores.db", "scores", key="id")))
prep: gpufleet.PipelineReport = p.run()
limiting: Optional[str] = prep.limiting_stage
errors: list[gpufleet.ItemError] = prep.errors
stage: gpufleet.StageReport = prep.stage("source")
busy: float = stage.busy_s
prep.stage(0)  # type: ignore[arg-type]
providers: list = gpufleet.onnx.providers("cuda:0", cache_dir="trt")
