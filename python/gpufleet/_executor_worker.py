"""The body of a gpufleet worker process (executor worker or spawn rank). CUDA_VISIBLE_DEVICES was set
in its environment before the interpreter started, so `cuda:0` here is its own GPU.

The parent talks to it over one Unix socket (Note [Shared-memory arenas] in _ipc.py). Its first frame
is ``("hello", preparation, mode, info)`` with the initializer (executor) or the rank's function
(spawn) as payload. An executor worker then answers ``("ready",)`` (or ``("init_error", ...)`` and
exits) and serves frames in order: ``("fn", id)`` defines a function it keeps (sent once per worker,
Note [Calls in flight] in _executor_io.py), ``("call", call_id, fn_id, chunked)`` runs one call (or
a chunk of ``map``), ``("forget", ids)``, ``("stop",)``. Each call answers ``("ok", call_id)`` with the
result as payload or ``("error", call_id, pickled exception, traceback, summary)``.
"""
from __future__ import annotations

import logging
import socket
import sys
import time
import traceback


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


class _Unloadable:
    """A function whose definition failed to unpickle here: every call of it raises that error."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


def _run_rank(chan, rank: int, payload) -> None:
    """spawn: ``fn(rank, *args)`` with torch.multiprocessing's exit rules: returning (or
    ``sys.exit(0)``) is success, ``sys.exit(n)`` is exit code n, an exception sends its traceback
    and exits with 1, a KeyboardInterrupt (the parent stopping us) exits quietly."""
    try:
        fn, args = payload.load()
        payload = None
        fn(rank, *args)
    except KeyboardInterrupt:
        return
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - everything else goes back to the parent
        chan.send(("error", traceback.format_exc()))
        sys.exit(1)
    chan.send(("ok",))


def _flush_log_queues(logger) -> None:
    """What the worker just logged through a ``QueueHandler`` onto a multiprocessing queue is in the
    queue's pipe before the parent hears of the failure (and breaks the executor at once): a
    multiprocessing queue's feeder thread writes later, and CPython's worker gets the same guarantee
    from exiting before its pool breaks. The worker is about to exit, so the queue is closed."""
    import logging.handlers

    while logger is not None:
        for h in logger.handlers:
            q = getattr(h, "queue", None) if isinstance(h, logging.handlers.QueueHandler) else None
            if q is not None and hasattr(q, "join_thread"):
                try:
                    q.close()
                    q.join_thread()
                except Exception:  # noqa: BLE001 - a queue in a state of its own: the record may be lost, as before
                    pass
        logger = logger.parent if logger.propagate else None


def _serve(chan, payload) -> None:
    """executor: the initializer, then frames until ``stop`` or the parent goes away."""
    from . import _serialize

    if payload is not None:
        try:
            init, args, kwargs = payload.load()
            payload = None
            init(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            # as ProcessPoolExecutor's worker does: logged here, and the parent breaks the executor
            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            _flush_log_queues(logging.getLogger("concurrent.futures"))
            chan.send(("init_error",) + _exc_payload(e))
            return
        finally:
            init = args = kwargs = None
    chan.send(("ready",))
    fns: dict = {}
    took: dict = {}  # fn id -> (calls, seconds per call as a moving average)
    out: list = []  # results not written yet (see _hold)
    while True:
        if out and not _hold(chan, took, len(out)):
            chan.send_frames(out)
            out = []
        try:
            header, payload = chan.recv()
        except (EOFError, OSError):
            return
        kind = header[0]
        if kind == "call":
            _, call_id, fn_id, chunked = header
            t0 = time.perf_counter()
            try:
                obj = payload.load()  # an argument that fails to unpickle fails this call only
                payload = None
                if fn_id is None:
                    fn, args, kwargs = obj
                else:
                    fn, (args, kwargs) = fns[fn_id], (obj if not chunked else (obj, None))
                obj = None
                result = [fn(*a) for a in args] if chunked else fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001
                out.append(chan.pack(("error", call_id) + _exc_payload(e)))
                continue
            finally:
                # the call's arguments are freed now, not when the next call arrives
                fn = args = kwargs = obj = payload = None
            try:
                body = _serialize.dumps(result)
            except BaseException as e:  # noqa: BLE001 - an unpicklable result, or SystemExit from __reduce__
                result = None
                out.append(chan.pack(("error", call_id) + _exc_payload(e)))
                continue
            result = None
            out.append(chan.pack(("ok", call_id), body))
            body = None
            dt = time.perf_counter() - t0
            n, avg = took.get(fn_id, (0, dt))
            took[fn_id] = (n + 1, 0.8 * avg + 0.2 * dt)
        elif kind == "fn":
            try:
                fns[header[1]] = payload.load()
            except BaseException as e:  # noqa: BLE001 - e.g. a module the worker cannot import
                fns[header[1]] = _Unloadable(e)
            payload = None
        elif kind == "forget":
            for fn_id in header[1]:
                fns.pop(fn_id, None)
                took.pop(fn_id, None)
        elif kind == "stop":
            if out:
                chan.send_frames(out)
            return


def _hold(chan, took: dict, held: int) -> bool:
    """Whether results may wait to go out with the next ones (one write then carries many: a map
    over tiny items): only while the next call is already here and its function has taken under
    0.5 ms on average over at least 16 calls, and never more than 32 results. So a result waits
    behind another call only when that call's function has been consistently tiny."""
    if held >= 32:
        return False
    nxt = chan.peek()
    if nxt is None or nxt[0][0] != "call":
        return False
    n, avg = took.get(nxt[0][2], (0, 1.0))
    return n >= 16 and avg < 0.0005


_channel = None  # this worker's connection to the parent (tests look at it)


def main() -> None:
    global _channel
    from . import _ipc

    chan = _channel = _ipc.Channel(socket.socket(fileno=int(sys.argv[1])))
    header, payload = chan.recv()
    _, prep, mode, info = header
    _prepare(prep)
    from . import _executor

    _executor._set_worker_info(info)
    if mode == "spawn":
        _run_rank(chan, info["rank"], payload)
    else:
        _serve(chan, payload)


if __name__ == "__main__":
    main()
