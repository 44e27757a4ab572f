"""The body of a gpufleet worker process (executor worker or spawn rank). CUDA_VISIBLE_DEVICES was set
in its environment before the interpreter started, so `cuda:0` here is its own GPU."""
from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection


def _exc_payload(e: BaseException):
    from . import _serialize

    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = _serialize.dumps(e, out_of_band=False).data
        _serialize.loads(blob)
    except BaseException:  # noqa: BLE001 - an exception that does not survive the trip: its text does
        blob = None
    return blob, tb, f"{type(e).__name__}: {e}"


def _prepare(prep: dict) -> None:
    """sys.path, cwd, argv and logging as multiprocessing's spawn prepares them, but without
    importing the parent's main module: functions from __main__ arrive by value (Note [Callables by
    value] in _serialize.py), so a script without an ``if __name__ == "__main__":`` guard is not
    run again here."""
    import multiprocessing.spawn

    prep = {k: v for k, v in prep.items() if k not in ("init_main_from_name", "init_main_from_path")}
    multiprocessing.spawn.prepare(prep)


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    _prepare(inbox.recv())
    from . import _executor, _ipc, _serialize

    mode, info = inbox.recv()
    _executor._set_worker_info(info)
    if mode == "spawn":
        try:
            fn, args = _serialize.loads(inbox.recv_bytes())
            fn(info["rank"], *args)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            outbox.send(("error",) + _exc_payload(e))
            sys.exit(1)
        outbox.send(("ok", None, None, None))
        return
    # executor: [initializer], then tasks until None; arrays both ways in shared memory (Note
    # [Out-of-band buffers] in _ipc.py)
    chan = _ipc.Channel(inbox, outbox, info.get("owner", os.getppid()))
    while True:
        try:
            header, payload = chan.recv()
        except EOFError:
            return
        except _ipc.LoadError as e:  # the call's file is gone; the header still says which call
            header, payload = e.header, e
        if header is None and payload is None:
            return
        kind, task_id = header
        try:
            if isinstance(payload, BaseException):
                raise payload
            fn, args, kwargs = payload.load()  # an argument that fails to unpickle fails this call only
            del payload
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            if kind == "init":
                chan.send(("init_error", task_id) + _exc_payload(e))
                return
            chan.send(("error", task_id) + _exc_payload(e))
            continue
        finally:
            fn = args = kwargs = payload = None  # the call's arguments are freed now, not at the next call
        if kind == "init":
            continue  # only a failing initializer answers
        try:
            out = _serialize.dumps(result)
        except BaseException as e:  # noqa: BLE001 - unpicklable result, or SystemExit raised by __reduce__
            result = None
            chan.send(("error", task_id) + _exc_payload(e))
            continue
        result = None
        chan.send(("ok", task_id), out)
        out = None


if __name__ == "__main__":
    main()
