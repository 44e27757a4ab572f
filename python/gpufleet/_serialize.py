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
``if __name__ == "__main__":`` guard; gpufleet does not). The functions of one script or notebook
still share their globals in a worker, as a module's would (Note [Globals of functions sent by
value]): an initializer can set the model a task function reads.

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
import os
import pickle
import threading
import types
import weakref
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


# Note [Globals of functions sent by value]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# cloudpickle rebuilds each function sent by value with its own copy of the globals it uses, so two
# functions of one script that share a global in the parent do not share it in the worker: an
# initializer's ``global model; model = load()`` would be invisible to the task function. So here
# every function by value of one module of the parent (the script's __main__, a notebook) is rebuilt
# in one namespace per worker, as its module's functions would be, and a global it uses travels
# with it together with a token of the parent's binding (the value of a number or a string, the
# identity of anything else). The worker takes the parent's value when the name is new to it or
# the parent has rebound the name since (a notebook cell re-run with ``threshold = 7``); while the
# parent's binding is unchanged, the worker keeps its own: what its initializer assigned, or a dict
# it filled in place (``CACHE["model"] = load()``).

_SCALARS = (int, float, complex, str, bytes, bool, type(None))
_namespaces: dict = {}  # (module name, parent's globals id) -> (namespace, tokens of what was installed)
_MISSING = object()
try:
    from cloudpickle.cloudpickle import _extract_code_globals as _code_globals
    from cloudpickle.cloudpickle import _function_getstate, _function_setstate, _make_function
except ImportError:  # pragma: no cover - another cloudpickle layout: its own rule (one copy per function)
    _function_setstate = None


def _token(value: Any):
    return ("=", type(value).__name__, value) if type(value) in _SCALARS else ("id", id(value))


def _shared_namespace(key, base: dict) -> dict:
    got = _namespaces.get(key)
    if got is None:
        got = _namespaces[key] = (dict(base), {})
    return got[0]


class _Namespace:
    """Pickles as the worker's namespace for one module of the parent."""

    def __init__(self, key, base: dict):
        self.key, self.base = key, base

    def __reduce__(self):
        return _shared_namespace, (self.key, self.base)


def _setstate_shared(func, state) -> None:
    """cloudpickle's ``_function_setstate``, minus the globals the worker keeps (see the Note)."""
    state, slotstate = state
    tokens = slotstate.pop("_gpufleet_tokens")
    installed = next((t for ns, t in _namespaces.values() if ns is func.__globals__), None)
    if installed is not None:
        f_globals = slotstate["__globals__"]
        for name, token in tokens.items():
            if name in func.__globals__ and installed.get(name) == token:
                f_globals.pop(name, None)  # the parent's binding is unchanged: the worker's value stays
        installed.update(tokens)
    _function_setstate(func, (state, slotstate))


class _Pickler(cloudpickle.Pickler):
    # multiprocessing's reducers (connections, sockets) on top of cloudpickle's and copyreg's, as
    # Connection.send would use them
    dispatch_table = ChainMap(getattr(ForkingPickler, "_extra_reducers", {}), cloudpickle.Pickler._dispatch_table,
                              copyreg.dispatch_table)

    if _function_setstate is not None:
        def _dynamic_function_reduce(self, func):
            """Note [Globals of functions sent by value]."""
            code, base, name, argdefs, closure = self._function_getnewargs(func)
            spaces = self.__dict__.setdefault("_gpufleet_spaces", {})
            ns = spaces.get(id(func.__globals__))
            if ns is None:
                key = (func.__globals__.get("__name__"), os.getpid(), id(func.__globals__))
                ns = spaces[id(func.__globals__)] = _Namespace(key, base)
            state, slotstate = _function_getstate(func)
            slotstate["_gpufleet_tokens"] = {k: _token(v) for k, v in slotstate["__globals__"].items()}
            return _make_function, (code, ns, name, argdefs, closure), (state, slotstate), None, None, _setstate_shared


class Payload:
    """A pickled object: ``data`` (the pickle) and ``buffers`` (its large buffers, out of band)."""

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: Sequence[pickle.PickleBuffer] = ()):
        self.data = data
        self.buffers = list(buffers)

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.raw().nbytes for b in self.buffers)


try:  # cloudpickle's own rule for "the receiver can import this"
    from cloudpickle.cloudpickle import _should_pickle_by_reference as _by_reference
except ImportError:  # pragma: no cover - another cloudpickle layout: always the full pickler
    _by_reference = None


class _ByValue(Exception):
    pass


class _FastPickler(pickle.Pickler):
    """The C pickler, for the common case where every function and class in the object is
    importable (plain data, NumPy arrays, module-level functions); it gives up at the first function
    or class that must travel by value, and cloudpickle starts over. ``reducer_override`` is not
    called for ints, strings, tuples, lists or dicts, so arguments cost what ``pickle`` costs. One
    per thread, reused (making a Pickler costs more than pickling a few small arguments)."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and not _by_reference(obj):
            raise _ByValue
        return NotImplemented


class _Fast:
    def __init__(self):
        self.busy = False
        self.big: list = []
        self.out_of_band = True
        self.f = io.BytesIO()
        self.copyreg_size = -1
        self.p = _FastPickler(self.f, protocol=5, buffer_callback=self._keep)

    def _keep(self, pb: pickle.PickleBuffer) -> bool:
        if not self.out_of_band:
            return True
        if _out_of_band(pb):
            self.big.append(pb)
            return False
        return True

    def dump(self, obj: Any, out_of_band: bool) -> tuple[bytes, list]:
        if len(copyreg.dispatch_table) != self.copyreg_size:  # a reducer registered since: take it
            self.copyreg_size = len(copyreg.dispatch_table)
            self.p.dispatch_table = dict(ChainMap(*_Pickler.dispatch_table.maps))
        self.busy, self.out_of_band, self.big = True, out_of_band, []
        f = self.f
        try:
            f.seek(0)
            f.truncate()
            self.p.clear_memo()
            self.p.dump(obj)
            return f.getvalue(), self.big
        finally:
            self.p.clear_memo()  # the memo references what was pickled: keep nothing alive
            self.busy, self.big = False, []
            if f.tell() > 1 << 20:
                f.seek(0)
                f.truncate()


_per_thread: dict[int, _Fast] = {}


def _fast_for_this_thread() -> _Fast:
    tid = threading.get_ident()
    st = _per_thread.get(tid)
    if st is None:
        if len(_per_thread) > 64:  # forget threads that ended
            live = {t.ident for t in threading.enumerate()}
            for k in [k for k in _per_thread if k not in live]:
                _per_thread.pop(k, None)
        st = _per_thread[tid] = _Fast()
    return st


def _out_of_band(pb: pickle.PickleBuffer) -> bool:
    try:
        raw = pb.raw()
    except BufferError:  # not contiguous: in band
        return False
    return raw.nbytes >= THRESHOLD


def _pickle(obj: Any, out_of_band: bool) -> tuple[bytes, list]:
    fast = _fast_for_this_thread() if _by_reference is not None else None
    if fast is not None and not fast.busy:  # busy: a __reduce__ pickling something itself
        try:
            return fast.dump(obj, out_of_band)
        except BaseException as e:  # noqa: BLE001 - what the fast path cannot do, cloudpickle may
            if isinstance(e, KeyboardInterrupt):
                raise
    big: list[pickle.PickleBuffer] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        if _out_of_band(pb):
            big.append(pb)
            return False
        return True

    f = io.BytesIO()
    _Pickler(f, protocol=5, buffer_callback=keep if out_of_band else None).dump(obj)
    return f.getvalue(), big


def _dumps(obj: Any) -> bytes:
    return _pickle(obj, False)[0]


def dumps(obj: Any, *, out_of_band: bool = True) -> Payload:
    """``obj`` pickled by value where needed (Note [Callables by value]); large contiguous buffers
    out of band when ``out_of_band``. Errors propagate as the pickler raised them."""
    data, big = _pickle(obj, out_of_band)
    return Payload(data, big)


class _ForChild:
    """Stands in for multiprocessing's spawning Popen while a payload for a new process is pickled:
    multiprocessing objects (Queue, SimpleQueue, Event, Lock, Connection) then pickle as they do for
    ``Process(args=...)``, their descriptors recorded to be inherited at the same numbers."""

    def __init__(self):
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    @staticmethod
    def DupFd(fd: int):  # noqa: N802 - multiprocessing's name
        from multiprocessing.popen_spawn_posix import _DupFd

        return _DupFd(fd)


def dumps_for_child(obj: Any, what: str) -> tuple[Payload, list[int]]:
    """``dumps_checked`` for a payload a process receives as it starts (spawn's function and args,
    an executor's initializer): multiprocessing queues, events and locks made with
    ``multiprocessing.get_context("spawn")`` pickle as they do for ``torch.multiprocessing.spawn``.
    Returns the payload and the descriptors the child inherits (keep ``obj`` alive meanwhile)."""
    from multiprocessing import context

    stub = _ForChild()
    context.set_spawning_popen(stub)
    try:
        payload = dumps_checked(obj, what, out_of_band=False)
    finally:
        context.set_spawning_popen(None)
    return payload, sorted(set(stub.fds))


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


_by_value_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # function -> (fingerprint, Payload)


def _fingerprint(fn, seen: set) -> Optional[tuple]:
    """What a by-value pickle of ``fn`` depends on, as tokens (Note [Globals of functions sent by
    value]): its code, defaults, the globals and closure values it uses, and the same for the
    functions by value among those. None when it cannot tell (an empty cell)."""
    seen.add(id(fn))
    parts = [fn.__code__, id(fn.__defaults__), id(fn.__kwdefaults__), tuple(fn.__dict__)]
    values = [fn.__globals__.get(n, _MISSING) for n in _code_globals(fn.__code__)]
    try:
        values += [c.cell_contents for c in fn.__closure__ or ()]
    except ValueError:
        return None
    for v in values:
        parts.append(_token(v))
        if isinstance(v, types.FunctionType) and id(v) not in seen and not _by_reference(v):
            sub = _fingerprint(v, seen)
            if sub is None:
                return None
            parts.append(sub)
    return tuple(parts)


def dumps_function(fn: Callable, what: str) -> Payload:
    """``fn`` pickled; a function sent by value is pickled again only when something it depends on
    changed (``_fingerprint``): submitting a notebook's function costs what pickling it by
    reference costs. ``SerializationError`` names the function and what cannot be pickled."""
    cacheable = (_function_setstate is not None and _by_reference is not None
                 and isinstance(fn, types.FunctionType) and not _by_reference(fn))
    key = None
    if cacheable:
        key = _fingerprint(fn, set())
        got = _by_value_cache.get(fn)
        if key is not None and got is not None and got[0] == key:
            return got[1]
    try:
        payload = dumps(fn)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _explain(f"the function {_name(fn)} of {what}", fn, e) from None
    if key is not None and not payload.buffers:
        _by_value_cache[fn] = (key, payload)
    return payload


def dumps_call(fn: Callable, args: tuple, kwargs: dict, what: str = "submit()") -> tuple[Payload, Payload]:
    """The function and the arguments ``(args, kwargs)`` of a call, pickled apart (a worker keeps
    a function it has seen, Note [Calls in flight] in _executor_io.py). ``SerializationError``
    names the function or the argument that cannot be pickled."""
    return dumps_function(fn, what), dumps_args(args, kwargs, what)


def dumps_args(args: tuple, kwargs: Optional[dict], what: str) -> Payload:
    """``(args, kwargs)`` pickled (``args`` alone when ``kwargs`` is None), errors naming the argument."""
    try:
        return dumps(args if kwargs is None else (args, kwargs))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        parts = [(f"argument {i} of {what}", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r} of {what}", v) for k, v in (kwargs or {}).items()]
        for label, part in parts:
            try:
                _dumps(part)
            except BaseException as inner:  # noqa: BLE001
                if isinstance(inner, KeyboardInterrupt):
                    raise
                raise _explain(label, part, inner) from None
        raise _explain(f"the arguments of {what}", args, e) from None


def _explain(label: str, obj: Any, err: BaseException) -> SerializationError:
    path, culprit, cause = _culprit(obj, [], err, 0)
    where = label + (f" (at {''.join(path).strip()})" if path else "")
    hint = ""
    if "fork context" in str(cause):
        hint = "; make it with multiprocessing.get_context('spawn'), as torch.multiprocessing.spawn needs too"
    elif "through inheritance" in str(cause):
        hint = ("; multiprocessing queues, locks and events reach a worker only through spawn() args or the "
                "executor's initargs (as with ProcessPoolExecutor); a Manager()'s can be passed anywhere")
    exc = SerializationError(f"{where} cannot be sent to a worker process: {_short_repr(culprit)} cannot be "
                             f"pickled ({type(cause).__name__}: {cause}){hint}")
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
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)) and _pickled_by_default(obj):
        try:
            return [(f".{k}", v) for k, v in vars(obj).items()]
        except TypeError:
            return []
    return []


def _pickled_by_default(obj: Any) -> bool:
    """True when ``obj`` pickles as its ``__dict__`` (no reducer of its own): only then is a part of
    its ``__dict__`` the better culprit; otherwise its own error says more (a fork-context queue)."""
    t = type(obj)
    return (t.__reduce_ex__ is object.__reduce_ex__ and t.__reduce__ is object.__reduce__
            and getattr(t, "__getstate__", None) is getattr(object, "__getstate__", None))


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
