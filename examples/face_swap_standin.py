"""A stand-in for seed 000's face-swap program (multi_face_single_source.py): takes a video and an
image path, "works" for a while (a busy loop on the CPU, or a small CUDA allocation when PyTorch and
a GPU are there), and writes the output file. It prints where it ran, the way a real GPU program
would see it (CUDA_VISIBLE_DEVICES, so cuda:0 is its own GPU)."""
import argparse
import hashlib
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--vid_path", required=True)
ap.add_argument("--swap_source", required=True)
ap.add_argument("--output", required=True)
ap.add_argument("--seconds", type=float, default=0.5)
ap.add_argument("--fail", action="store_true", help="exit with status 1 (to show failures and retries)")
a = ap.parse_args()

gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "?")
print(f"swapping {os.path.basename(a.swap_source)} into {os.path.basename(a.vid_path)} on GPU {gpu}", flush=True)
h = hashlib.sha256()
for p in (a.vid_path, a.swap_source):
    with open(p, "rb") as f:
        h.update(f.read())
end = time.monotonic() + a.seconds
while time.monotonic() < end:  # "inference"
    h.update(h.digest())
if a.fail:
    print("model crashed (simulated)", file=sys.stderr)
    sys.exit(1)
with open(a.output, "w") as f:  # a real program writes frames progressively: partial until done
    f.write(f"swapped video {os.path.basename(a.vid_path)} x {os.path.basename(a.swap_source)} on GPU {gpu}\n")
    f.write(h.hexdigest() + "\n")
