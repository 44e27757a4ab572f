"""A model loaded once per GPU by the initializer, thousands of items mapped across GPUs.

    python examples/executor_inference.py [--items N] [--slots K]

Each worker is a fresh process whose CUDA_VISIBLE_DEVICES names its own GPU, so `cuda:0` inside it
is that GPU (with PyTorch installed and real GPUs, the model really goes there). Without GPUs the
example simulates four (the workers are real processes, the "model" a NumPy matrix)."""
import argparse
import os
import time
from collections import Counter

import numpy as np

import gpufleet

_model = None


def load_model(seed):
    """Runs once per worker: the expensive part (weights, CUDA context) happens here, not per item."""
    global _model
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((64, 10)).astype(np.float32)
    try:
        import torch  # noqa: F401

        if torch.cuda.is_available():
            weights = torch.from_numpy(weights).to("cuda:0")  # this worker's own GPU
    except ImportError:
        pass
    _model = weights


def infer(batch):
    x = np.asarray(batch, dtype=np.float32)
    w = _model
    if not isinstance(w, np.ndarray):  # a torch tensor on the GPU
        import torch

        y = (torch.from_numpy(x).to(w.device) @ w).argmax(1).cpu().numpy()
    else:
        y = (x @ w).argmax(1)
    return gpufleet.worker_info().device, y


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--slots", type=int, default=1)
    a = ap.parse_args()
    if gpufleet.device_count() == 0:
        print("no GPU here: simulating four GPUs (workers are real processes)")
        gpufleet.simulate_gpus(4)
    data = np.random.default_rng(1).standard_normal((a.items, 64)).astype(np.float32)
    batches = [data[i:i + a.batch] for i in range(0, a.items, a.batch)]
    t0 = time.perf_counter()
    with gpufleet.GPUExecutor(slots_per_device=a.slots, initializer=load_model, initargs=(0,)) as ex:
        print("workers:", ", ".join(f"{d} (pid {p})" for d, p in ex.workers))
        results = list(ex.map(infer, batches))
    dt = time.perf_counter() - t0
    per_device = Counter(dev for dev, _ in results)
    labels = np.concatenate([y for _, y in results])
    print(f"{a.items} items in {len(batches)} batches in {dt:.2f} s ({a.items / dt:.0f} items/s, startup included)")
    print("batches per device:", dict(sorted(per_device.items())))
    print("label histogram:", np.bincount(labels, minlength=10).tolist())
