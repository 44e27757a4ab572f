"""Seed 000 (multi_swap_10s_v2.py) done right: one face-swap command per (video, image) pair, spread
over every GPU with a shared work-conserving queue, never re-running a finished pair, never trusting
a half-written output, draining on Ctrl-C, and showing what each GPU did.

    python examples/multi_swap.py [OUT_DIR] [--videos N] [--images M] [--seconds S] [--slots K]

Without GPUs it runs on a simulated four-GPU topology (the commands are real processes; only the
GPUs are simulated). Writes the timeline PNG and the Chrome trace (open it in https://ui.perfetto.dev)
into OUT_DIR (default: a new temporary directory) and prints their paths.
"""
import argparse
import os
import random
import sys
import tempfile

import gpufleet
from _needs import need

need("matplotlib")  # the timeline picture

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("out_dir", nargs="?", default=None)
ap.add_argument("--videos", type=int, default=6)
ap.add_argument("--images", type=int, default=4)
ap.add_argument("--seconds", type=float, default=1.0, help="mean work per pair (default 1 s)")
ap.add_argument("--slots", type=int, default=2, help="tasks per GPU at a time")
a = ap.parse_args()

out_dir = a.out_dir or tempfile.mkdtemp(prefix="gpufleet-multi-swap-")
os.makedirs(out_dir, exist_ok=True)
if gpufleet.device_count() == 0:
    print("no GPU here: simulating four GPUs (tasks are real processes)")
    gpufleet.simulate_gpus(4)

# The user's data: source videos and face images (file names with spaces are fine).
data = os.path.join(out_dir, "data")
os.makedirs(os.path.join(data, "videos"), exist_ok=True)
os.makedirs(os.path.join(data, "images"), exist_ok=True)
rng = random.Random(0)
for i in range(a.videos):
    with open(os.path.join(data, "videos", f"{i:03d}.mp4"), "wb") as f:
        f.write(rng.randbytes(4096))
for i in range(a.images):
    with open(os.path.join(data, "images", f"face {i}.jpg"), "wb") as f:
        f.write(rng.randbytes(1024))

standin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "face_swap_standin.py")
durations = {}


def tasks():
    """Lazily, like the seed's nested loops, but every pair is one Task with a declared output."""
    import glob

    for vid in sorted(glob.glob(os.path.join(data, "videos", "*.mp4"))):
        for img in sorted(glob.glob(os.path.join(data, "images", "*.jpg"))):
            stem = f"{os.path.splitext(os.path.basename(vid))[0]}_{os.path.splitext(os.path.basename(img))[0]}_c"
            secs = a.seconds * rng.uniform(0.4, 1.6)
            yield gpufleet.Task(
                [sys.executable, standin, "--vid_path", vid, "--swap_source", img, "--output", "{output}",
                 "--seconds", f"{secs:.2f}"],
                outputs=[os.path.join(out_dir, "swapped", stem + ".mp4")], name=stem, retries=1)


report = gpufleet.run(tasks(), slots_per_device=a.slots, journal=os.path.join(out_dir, "journal.sqlite"),
                      resume=True, log_dir=os.path.join(out_dir, "logs"), progress=True,
                      total=a.videos * a.images)
print()
print(report.summary())
trace = report.to_chrome_trace(os.path.join(out_dir, "multi_swap_trace.json"))
png = report.plot_timeline(os.path.join(out_dir, "multi_swap_timeline.png"))
print(f"timeline: {png}")
print(f"trace:    {trace} (open in https://ui.perfetto.dev)")
print(f"outputs:  {os.path.join(out_dir, 'swapped')} ({len(os.listdir(os.path.join(out_dir, 'swapped')))} files); "
      f"run again with the same OUT_DIR to resume (finished pairs are skipped)")
sys.exit(0 if report.ok else 1)
