"""`make demo`: gpufleet's main jobs on this machine, with no GPU and no server needed.

1. `gpufleet info` and a device selection on a simulated four-GPU topology;
2. the dispatcher: seed 000's face-swap batch (examples/multi_swap.py) with progress, summary,
   timeline picture and Chrome trace;
3. tensors (examples/device_basics.py) and kernels (examples/depth_congestion.py);
4. the pipeline: seed 003's depth postprocess end to end (examples/depth_pipeline.py) with the
   congestion kernels and an SQLite sink, and its per-stage report.

Everything it writes goes under OUT_DIR (default: out/demo).
"""
import os
import subprocess
import sys

import gpufleet

HERE = os.path.dirname(os.path.abspath(__file__))
out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "out", "demo"))
os.makedirs(out, exist_ok=True)


def step(title, argv):
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, *argv], check=True)


step("devices", ["-m", "gpufleet", "info"])

print("\n=== selection on a simulated topology: four 80 GiB GPUs, two of them busy", flush=True)
with gpufleet.simulate_gpus([
    {"name": "Simulated H100", "free_memory": "6GiB", "utilization": 97, "processes": 1},
    {"name": "Simulated H100"},
    {"name": "Simulated H100", "free_memory": "30GiB", "utilization": 40, "processes": 2},
    {"name": "Simulated H100", "free_memory": "79GiB", "utilization": 3},
]):
    print("select_devices(2, min_free_memory='20GiB') ->",
          [str(d) for d in gpufleet.select_devices(2, min_free_memory="20GiB")])
    try:
        gpufleet.select_devices(3, min_free_memory="40GiB", max_utilization=50)
    except gpufleet.DeviceSelectionError as e:
        print(f"select_devices(3, min_free_memory='40GiB', max_utilization=50) raises:\n{e}")

step("dispatcher: seed 000 (one face-swap command per video x image pair)",
     [os.path.join(HERE, "multi_swap.py"), os.path.join(out, "multi_swap")])
step("tensors and transfers: seed 004 the gpufleet way", [os.path.join(HERE, "device_basics.py")])
step("kernels: seed 003's postprocess chain on synthetic depth images", [os.path.join(HERE, "depth_congestion.py")])
step("pipeline: seed 003 (depth model -> congestion kernels -> SQLite)",
     [os.path.join(HERE, "depth_pipeline.py"), "--workdir", os.path.join(out, "depth_pipeline"),
      "--plot", os.path.join(out, "depth_pipeline", "stages.png")])
print(f"\nmake demo: done; outputs under {out}")
