"""How callables and their arguments travel to worker processes (executor, spawn, process pipelines).

Note [Callables by value]
~~~~~~~~~~~~~~~~~~~~~~~~~
``pickle`` saves a function or class as a reference (module + name) that the receiver imports.
That fails for everything a user writes interactively: a lambda, a closure, a function defined in a
notebook cell, in ``python -c``, or in the script run as ``__main__`` (the worker's ``__main__`` is
not the user's). We pickle with ``cloudpickle`` (as Ray, Dask and loky do): functions and classes
that the receiver could not import (``__main__``, lambdas, closures, dynamic modules) are saved *by
value* (code, defaults, the globals they use); anything importable stays a reference, so a
module-level function of a package costs what ``pickle`` costs. Workers therefore never re-run the
user's main module (``multiprocessing``'s spawn method does, which is why it needs the
``if __name__ == "__main__":`` guard; gpufleet does not).

Serialisation happens in the caller's thread at ``submit``/``spawn`` time, so an object that cannot
be pickled fails there, synchronously, with ``SerializationError`` naming the object (``args[1]
['lock']``) and the reason. Deserialisation happens in the worker per call: an argument whose
unpickling raises fails that call with the worker's real exception, and the worker goes on.

Buffers of at least ``THRESHOLD`` bytes (NumPy arrays, ``pickle.PickleBuffer``) are taken out of
band (pickle protocol 5): ``Payload.buffers`` references the caller's memory without copying it,
and the transport (Note [Out-of-band buffers] in _ipc.py) copies it once into shared memory.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import types
from collections import ChainMap
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Optional, Sequence

import cloudpickle

__all__ = ["SerializationError"]

THRESHOLD = 256 * 1024


class SerializationError(pickle.PicklingError, TypeError):
    """An object given to a worker cannot be pickled; the message names it and says why (the
    original error is the ``__cause__``). Raised synchronously by ``GPUExecutor.submit``/``map``,
    ``spawn`` and process pipelines, before anything is sent."""


class _Pickler(cloudpickle.Pickler):
    # multiprocessing's reducers (connections, sockets) on top of cloudpickle's and copyreg's, as
    # Connection.send would use them
    dispatch_table = ChainMap(getattr(ForkingPickler, "_extra_reducers", {}), cloudpickle.Pickler._dispatch_table,
                              copyreg.dispatch_table)


class Payload:
    """A pickled object: ``data`` (the pickle) and ``buffers`` (its large buffers, out of band)."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: Sequence[pickle.PickleBuffer] = ()):
        self.data = data
        self.buffers = list(buffers)

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.raw().nbytes for b in self.buffers)


def _dumps(obj: Any, buffer_callback: Optional[Callable] = None) -> bytes:
    f = io.BytesIO()
    _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


def dumps(obj: Any, *, out_of_band: bool = True) -> Payload:
    """``obj`` pickled by value where needed (Note [Callables by value]); large contiguous buffers
    out of band when ``out_of_band``. Errors propagate as the pickler raised them."""
    big: list[pickle.PickleBuffer] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < THRESHOLD:
            return True
        big.append(pb)
        return False

    data = _dumps(obj, keep if out_of_band else None)
    return Payload(data, big)


def loads(data: Any, buffers: Sequence[Any] = ()) -> Any:
    return pickle.loads(data, buffers=buffers)


def dumps_checked(obj: Any, what: str, *, out_of_band: bool = True) -> Payload:
    """``dumps``, raising ``SerializationError`` naming the part of ``obj`` that cannot be pickled.
    ``what`` names ``obj`` for the user (``"the arguments of spawn()"``)."""
    try:
        return dumps(obj, out_of_band=out_of_band)
    except BaseException as e:  # noqa: BLE001 - __reduce__ may raise anything; SystemExit included
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _explain(what, obj, e) from None


def dumps_call(fn: Callable, args: tuple, kwargs: dict, what: str = "submit()") -> Payload:
    """The call ``fn(*args, **kwargs)`` pickled as one payload; ``SerializationError`` names the
    function or the argument that cannot be pickled."""
    try:
        return dumps((fn, args, kwargs))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        parts = [(f"the function {_name(fn)} of {what}", fn)]
        parts += [(f"argument {i} of {what}", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r} of {what}", v) for k, v in kwargs.items()]
        for label, part in parts:
            try:
                _dumps(part)
            except BaseException as inner:  # noqa: BLE001
                if isinstance(inner, KeyboardInterrupt):
                    raise
                raise _explain(label, part, inner) from None
        raise _explain(f"the call of {what}", (fn, args, kwargs), e) from None


def _explain(label: str, obj: Any, err: BaseException) -> SerializationError:
    path, culprit, cause = _culprit(obj, [], err, 0)
    where = label + (f" (at {''.join(path).strip()})" if path else "")
    exc = SerializationError(f"{where} cannot be sent to a worker process: {_short_repr(culprit)} cannot be "
                             f"pickled ({type(cause).__name__}: {cause})")
    exc.__cause__ = cause
    return exc


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or _short_repr(fn, 60)


def _short_repr(obj: Any, limit: int = 120) -> str:
    try:
        r = repr(obj)
    except Exception:  # noqa: BLE001
        r = f"<{type(obj).__name__} object>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _children(obj: Any) -> list:
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [(" an element", v) for v in obj]
    if isinstance(obj, types.FunctionType):
        out = []
        if obj.__closure__:
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__):
                try:
                    out.append((f" its closure variable {name!r}", cell.cell_contents))
                except ValueError:  # empty cell
                    pass
        names = set(obj.__code__.co_names)
        out += [(f" its global {k!r}", v) for k, v in obj.__globals__.items() if k in names]
        return out
    if isinstance(obj, types.MethodType):
        return [(" its instance", obj.__self__)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        try:
            return [(f".{k}", v) for k, v in vars(obj).items()]
        except TypeError:
            return []
    return []


def _culprit(obj: Any, path: list, err: BaseException, depth: int) -> tuple[list, Any, BaseException]:
    """The innermost part of ``obj`` that fails to pickle (containers, instance ``__dict__``s, a
    function's closure and globals, a few levels deep), its path and its error. Only runs after a
    failure."""
    if depth >= 6:
        return path, obj, err
    for sub, child in _children(obj):
        try:
            _dumps(child)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            return _culprit(child, path + [sub], e, depth + 1)
    return path, obj, err
