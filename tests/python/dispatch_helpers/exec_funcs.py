"""Functions the executor and spawn tests send to workers (importable by the fresh processes)."""
import os
import signal
import time

import gpufleet

_model = None
INIT_COUNT_FILE = None


def init(path):
    """The per-worker initializer: 'loads the model' once and records that it ran."""
    global _model
    _model = {"pid": os.getpid(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def where(x):
    info = gpufleet.worker_info()
    return {"x": x, "pid": os.getpid(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": info.device,
            "model_pid": None if _model is None else _model["pid"], "order": os.environ.get("CUDA_DEVICE_ORDER")}


def square(x):
    return x * x


def fail(x):
    raise ValueError(f"cannot handle {x!r}")


def die_by_signal(x):
    os.kill(os.getpid(), signal.SIGKILL)


def hard_exit(x):
    os._exit(x)


def sleep_and_record(path, secs):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(secs)
    return secs


def rank_env(rank, out_dir, fail_rank):
    import json

    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({**{k: os.environ.get(k) for k in keys}, "rank": rank, "pid": os.getpid()}, f)
    if rank == fail_rank:
        time.sleep(0.3)
        raise RuntimeError(f"rank {rank} diverged")
    if fail_rank == -2 and rank == 0:
        os.kill(os.getpid(), signal.SIGSEGV)
    if fail_rank >= 0:
        time.sleep(60)  # the others are stopped by the kill sequence


def _refuse_to_rebuild(why):
    raise ValueError(f"refusing to rebuild: {why}")


class Unrebuildable:
    """Pickles fine in the parent; unpickling it (in the worker) raises ValueError."""

    def __init__(self, why):
        self.why = why

    def __reduce__(self):
        return _refuse_to_rebuild, (self.why,)
