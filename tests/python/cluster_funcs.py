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
    """A factory whose model kills its own process on the batch holding ``fatal``, the first time."""
    where = gpufleet.worker_info().device

    def model(batch):
        marker = os.path.join(log_dir, "killed")
        if fatal in batch and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
        return [(x * 2, where) for x in batch]

    return model
