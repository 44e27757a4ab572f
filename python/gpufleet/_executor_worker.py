"""The body of a gpufleet worker process (executor worker or spawn rank). CUDA_VISIBLE_DEVICES was set
in its environment before the interpreter started, so `cuda:0` here is its own GPU."""
from __future__ import annotations

import os
import pickle
import sys
import traceback
from multiprocessing.connection import Connection


def _exc_payload(e: BaseException):
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, tb, f"{type(e).__name__}: {e}"


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    prep = inbox.recv()
    import multiprocessing.spawn

    multiprocessing.spawn.prepare(prep)  # sys.path, cwd and the parent's __main__, as multiprocessing does
    from . import _executor, _ipc

    mode, info = inbox.recv()
    _executor._set_worker_info(info)
    if mode == "spawn":
        fn, args = inbox.recv()
        try:
            fn(info["rank"], *args)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            outbox.send(("error",) + _exc_payload(e))
            sys.exit(1)
        outbox.send(("ok", None, None, None))
        return
    # executor: [initializer], then tasks until None; arrays both ways in shared memory (Note
    # [Out-of-band buffers] in _ipc.py)
    owner = info.get("owner", os.getppid())
    while True:
        try:
            msg = _ipc.recv(inbox)
        except EOFError:
            return
        if msg is None:
            return
        kind, task_id, fn, args, kwargs = msg
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            if kind == "init":
                outbox.send(("init_error", task_id) + _exc_payload(e))
                return
            outbox.send(("error", task_id) + _exc_payload(e))
            continue
        if kind == "init":
            continue  # only a failing initializer answers
        try:
            _ipc.send(outbox, ("ok", task_id, result), owner)
        except Exception as e:  # unpicklable result
            outbox.send(("error", task_id) + _exc_payload(e))


if __name__ == "__main__":
    main()
