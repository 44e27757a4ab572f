"""Seed 002 done right: one process per GPU, rank-aware, a tiny data-parallel training loop.

    python examples/spawn_training.py [--steps N]

With PyTorch installed it uses torch.distributed with the gloo backend (NCCL is the choice on real
multi-GPU machines: --backend nccl); without it, a NumPy stand-in averages gradients through files.
gpufleet.spawn sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT and
CUDA_VISIBLE_DEVICES for every rank before it starts, and stops all ranks on the first failure."""
import argparse
import os
import tempfile
import time

import numpy as np

import gpufleet


def make_data(rank, world, n=2048):
    rng = np.random.default_rng(123)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    w_true = np.arange(1, 9, dtype=np.float32)
    y = x @ w_true + 0.01 * rng.standard_normal(n).astype(np.float32)
    return x[rank::world], y[rank::world]  # each rank its shard


def train(rank, steps, backend, sync_dir):
    world = int(os.environ["WORLD_SIZE"])
    x, y = make_data(rank, world)
    info = gpufleet.worker_info()
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        torch = None
    if torch is not None:
        dist.init_process_group(backend, rank=rank, world_size=world)  # env:// from MASTER_ADDR/PORT
        dev = torch.device("cuda:0") if backend == "nccl" else torch.device("cpu")  # cuda:0 is this rank's GPU
        w = torch.zeros(8, device=dev)
        xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
        for step in range(steps):
            grad = 2 * xt.T @ (xt @ w - yt) / len(xt)
            dist.all_reduce(grad)
            w -= 0.05 * grad / world
        loss = float(((xt @ w - yt) ** 2).mean())
        dist.destroy_process_group()
        w = w.cpu().numpy()
    else:
        w = np.zeros(8, dtype=np.float32)
        for step in range(steps):  # all-reduce through files: each rank writes its gradient, reads all
            grad = 2 * x.T @ (x @ w - y) / len(x)
            tmp = os.path.join(sync_dir, f".g{step}-{rank}.npy")
            np.save(tmp, grad)
            os.replace(tmp, os.path.join(sync_dir, f"g{step}-{rank}.npy"))  # readers never see half a file
            paths = [os.path.join(sync_dir, f"g{step}-{r}.npy") for r in range(world)]
            while not all(os.path.exists(p) for p in paths):
                time.sleep(0.001)
            w -= 0.05 * sum(np.load(p) for p in paths) / world
        loss = float(((x @ w - y) ** 2).mean())
    print(f"rank {rank}/{world} on {info.device} (CUDA_VISIBLE_DEVICES={info.visible_devices}): "
          f"loss {loss:.4f}, w = {np.round(w, 2).tolist()}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", default="gloo")
    a = ap.parse_args()
    if gpufleet.device_count() == 0:
        print("no GPU here: simulating two GPUs (ranks are real processes)")
        gpufleet.simulate_gpus(2)
    with tempfile.TemporaryDirectory() as sync_dir:
        t0 = time.perf_counter()
        gpufleet.spawn(train, args=(a.steps, a.backend, sync_dir))
        print(f"all ranks finished in {time.perf_counter() - t0:.2f} s")
