"""Functions the cluster tests send to Ray workers by reference (the nodes import this module:
cluster_helpers.py puts tests/python on their PYTHONPATH)."""
from __future__ import annotations

import os
import time

import gpufleet

STATE: dict = {}


def init(log_dir: str) -> None:
    STATE["initialized"] = STATE.get("initialized", 0) + 1
    with open(os.path.join(log_dir, f"init-{os.getpid()}"), "a") as f:
        f.write("init\n")


def where(x: int) -> tuple:
    info = gpufleet.worker_info()
    return (x * x, info.device, os.environ.get("GPUFLEET_NODE_NAME"), os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.getpid(), STATE.get("initialized", 0))


def boom(x: int) -> None:
    raise ValueError(f"boom {x}")


def bad_init() -> None:
    raise RuntimeError("no model here")


def slow(path: str, seconds: float) -> int:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def double(a):
    return a * 2


def make_model(device, log_dir: str):
    """A pipeline replica's factory: records its build, returns the model."""
    with open(os.path.join(log_dir, f"build-{os.getpid()}"), "a") as f:
        f.write(f"{device}\n")
    where = gpufleet.worker_info().device

    def model(batch):
        return [(x * 2, where) for x in batch]

    return model


def make_fragile_model(device, log_dir: str, fatal: int):
    """A factory whose model kills its own process on the batch holding ``fatal``, the first time, after a
    moment of work (a process killed in the instant after a call returned may take that call's result
    with it: Note [Executor on a cluster])."""
    where = gpufleet.worker_info().device

    def model(batch):
        marker = os.path.join(log_dir, "killed")
        if fatal in batch and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(0.5)
            os.kill(os.getpid(), 9)
        return [(x * 2, where) for x in batch]

    return model


def rendezvous(rank: int, out_dir: str, fail_rank: int = -1) -> None:
    """A spawn rank: records its environment, then meets every other rank at MASTER_ADDR:MASTER_PORT
    (rank 0 listens, the others connect and send their rank: the address and port really work)."""
    import json
    import socket

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "GPUFLEET_NODE", "GPUFLEET_NODE_NAME", "GPUFLEET_DEVICE")
    info = {k: os.environ.get(k) for k in keys}
    info["pid"] = os.getpid()
    info["worker_device"] = gpufleet.worker_info().device
    if rank == fail_rank:
        raise RuntimeError(f"rank {rank} gives up")
    if fail_rank >= 0:
        time.sleep(60)  # the others wait: the failure must stop them
    addr, port, world = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:
        srv = socket.create_server((addr, port))
        seen = []
        for _ in range(world - 1):
            conn, _ = srv.accept()
            seen.append(int(conn.recv(16).decode()))
            conn.close()
        info["met"] = sorted(seen)
    else:
        end = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((addr, port), timeout=5) as c:
                    c.sendall(str(rank).encode())
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(info, f)
