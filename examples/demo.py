"""`make demo`: what gpufleet does, on this machine, with no GPU and no server needed.

For now: `gpufleet info` and a device selection on a simulated four-GPU topology."""
import subprocess
import sys

import gpufleet

print("$ gpufleet info")
subprocess.run([sys.executable, "-m", "gpufleet", "info"], check=True)

print("\n$ simulated topology: four 80 GiB GPUs, two of them busy")
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
