"""A real dispatcher process for the signal tests: runs `n` tasks of `cmd` (a shell snippet, $I is the
task number) on simulated GPUs, with a journal and declared outputs when asked; prints the summary."""
import argparse
import sys

import gpufleet

ap = argparse.ArgumentParser()
ap.add_argument("--gpus", type=int, default=2)
ap.add_argument("--slots", type=int, default=1)
ap.add_argument("--n", type=int, default=4)
ap.add_argument("--cmd", required=True)
ap.add_argument("--outdir", default=None)
ap.add_argument("--journal", default=None)
ap.add_argument("--resume", action="store_true")
ap.add_argument("--kill-grace", type=float, default=2.0)
a = ap.parse_args()

gpufleet.simulate_gpus(a.gpus)


def tasks():
    for i in range(a.n):
        outputs = [f"{a.outdir}/out{i}.txt"] if a.outdir else []
        yield gpufleet.Task(["sh", "-c", a.cmd, "task", str(i), "{output}" if outputs else ""],
                            env={"I": str(i)}, outputs=outputs, name=f"t{i}")


report = gpufleet.run(tasks(), slots_per_device=a.slots, journal=a.journal, resume=a.resume,
                      kill_grace=a.kill_grace, quiet=False, progress=False)
print(report.summary(), flush=True)
print("COUNTS", report.counts, flush=True)
sys.exit(0 if report.ok else 1)
