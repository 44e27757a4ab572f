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
        world = int(os.environ["WORLD_SIZE"])
        end = time.monotonic() + 30  # fail once every rank runs (and has written its record)
        while time.monotonic() < end and not all(os.path.exists(os.path.join(out_dir, f"rank{r}.json"))
                                                  for r in range(world)):
            time.sleep(0.01)
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


def init_fail(path):
    """An initializer that records its run and fails (a model file that is not there)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("model file missing")


def ident(x):
    return x


class Token:
    """Writes a file when the worker frees it (``path``), so a test sees when that happens."""

    def __init__(self, path=None):
        self.path = path

    def __del__(self):
        if self.path and gpufleet.worker_info() is not None:  # in a worker only
            with open(self.path, "a") as f:
                f.write("freed\n")


def token_path(token):
    return token.path


def _exit_now(code):
    import sys

    sys.exit(code)


class ExitAtPickle:
    def __reduce__(self):
        import sys

        sys.exit(3)


class ErrorAtUnpickle:
    def __reduce__(self):
        return _refuse_to_rebuild, ("a result",)


def make(cls_name):
    return globals()[cls_name]()


def fork_then_exit(path):
    """Forks a child that outlives this worker (it holds the worker's socket), then exits."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    with open(path, "w") as f:
        f.write(str(pid))
    os._exit(3)


def next_call_waiting(delay):
    """After ``delay`` seconds: whether the worker's next call is already in its socket."""
    import select

    from gpufleet import _executor_worker

    time.sleep(delay)
    sock = _executor_worker._channel.sock
    return bool(_executor_worker._channel.peek() or select.select([sock], [], [], 0)[0])


# ---- spawn ranks with torch.multiprocessing.spawn's test behaviours (tests/python/test_spawn.py) ----

def rank_put(rank, queue):
    queue.put(rank)


def rank_raise(rank, failing):
    if failing is None or rank == failing:
        time.sleep(0.05 * rank)
        raise ValueError(f"legitimate exception from process {rank}")
    time.sleep(30)  # stopped by the kill sequence


def rank_signal(rank, sig):
    if rank == 0:
        os.kill(os.getpid(), sig)
    time.sleep(30)


def rank_exit(rank, code):
    import sys

    if rank == 0:
        sys.exit(code)
    if code:
        time.sleep(30)


def rank_ok_then_raise(rank):
    if rank == 0:
        return
    time.sleep(0.1)
    raise ValueError("legitimate exception")


def rank_forever(rank):
    while True:
        time.sleep(1)
