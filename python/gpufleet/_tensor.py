"""Tensors and to-device transfers with PyTorch's semantics, zero-copy NumPy and DLPack exchange,
streams and events, the current device, caching-allocator stats, DataParallel-style scatter/gather
and a small ``Module`` whose ``.to()`` moves in place. The core lives in C++ (csrc/tensor); this
module adapts Python arguments.

Semantics worth knowing (PyTorch's unless said otherwise):

- ``t.to(device, dtype)`` returns ``t`` itself when nothing changes and ``copy=False``, else a new
  compact tensor. ``Module.to`` replaces its tensors in place and returns the module.
- ``from_numpy(a)``, ``t.numpy()`` and ``np.asarray(t)`` share memory (CPU tensors). ``numpy()`` of a
  CUDA tensor raises ``TypeError`` (call ``.cpu()`` first); of a bfloat16 tensor raises ``TypeError``
  (NumPy has no bfloat16: ``t.to(gpufleet.float32).numpy()`` is exact).
- ``non_blocking=True`` is asynchronous from/to pinned memory, on the current stream; from/to pageable
  memory the CUDA runtime makes the host side synchronous. gpufleet itself never reads a host buffer
  before its copy finished (``numpy()``, DLPack export and CPU copies wait for pending copies).
- Strides are in elements (``t.strides``), as in PyTorch; negative strides are not supported.
- DLPack: ``__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None)``; pinned tensors
  report ``kDLCUDAHost`` (3) from ``__dlpack_device__``.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import _core
from ._devices import Device, device_count

_bool = builtins.bool
_int = builtins.int
_float = builtins.float

Tensor = _core.Tensor
dtype = _core.dtype
Stream = _core.Stream
Event = _core.Event
as_dtype = _core.as_dtype

__all__ = [
    "Tensor", "dtype", "as_dtype", "Stream", "Event", "Module", "StateDictError", "IncompatibleKeys",
    "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
    "half", "double",
    "tensor", "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like",
    "from_numpy", "from_dlpack", "cat",
    "scatter", "gather", "broadcast", "chunk_sizes",
    "set_device", "current_device", "device", "stream", "current_stream", "default_stream", "synchronize",
    "memory_stats", "empty_cache", "reset_peak_memory_stats",
    "strip_prefix", "add_prefix",
]

DeviceLike = Union[Device, str, _int, Any]
DTypeLike = Union["dtype", str, Any]

# ---- tensors -------------------------------------------------------------------------------------


_DTYPE_NAMES = frozenset(["bool", "bool_", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16",
                          "float32", "float64", "half", "float", "double", "short", "int", "long"])


def _is_dtype_like(x: Any) -> _bool:
    if isinstance(x, (dtype, np.dtype)) or (isinstance(x, type) and issubclass(x, np.generic)):
        return True
    if isinstance(x, str):
        return x.removeprefix("torch.") in _DTYPE_NAMES
    if type(x).__name__ == "dtype":
        try:
            as_dtype(x)
            return True
        except (TypeError, ValueError):
            return False
    return False


def _parse_to_args(args: tuple, device: Any, dtype_: Any, non_blocking: _bool, copy: _bool):
    """``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(other_tensor)``, plus the
    positional ``non_blocking`` and ``copy`` flags PyTorch accepts after them."""
    flags = []
    for a in args:
        if isinstance(a, _bool):
            flags.append(a)
        elif flags:
            raise TypeError(f"to(): unexpected positional argument {a!r} after the boolean flags")
        elif isinstance(a, Tensor):
            device, dtype_ = a.device, a.dtype
        elif _is_dtype_like(a):
            if dtype_ is not None:
                raise TypeError(f"to(): dtype given twice ({dtype_!r} and {a!r})")
            dtype_ = a
        else:
            if device is not None:
                raise TypeError(f"to(): device given twice ({device!r} and {a!r})")
            device = a
    if len(flags) > 2:
        raise TypeError(f"to(): too many positional flags {flags!r}: expected non_blocking and copy")
    if flags:
        non_blocking = flags[0]
    if len(flags) > 1:
        copy = flags[1]
    return device, dtype_, _bool(non_blocking), _bool(copy)


def _tensor_to(self: Tensor, *args: Any, device: Any = None, dtype: Any = None, non_blocking: _bool = False,
               copy: _bool = False) -> Tensor:
    """Returns ``self`` when device and dtype already match and ``copy`` is false, else a new tensor.

    Accepts ``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(other)`` and keywords. ``cuda``
    without an index means the current device (``gpufleet.set_device``). ``non_blocking=True`` is
    asynchronous from/to pinned memory; a device-to-host copy then lands in pinned memory."""
    device, dtype, non_blocking, copy = _parse_to_args(args, device, dtype, non_blocking, copy)
    return self._to(device, dtype, non_blocking, copy)


def _index(self: Tensor, key: Any) -> Tensor:
    if not isinstance(key, tuple):
        key = (key,)
    out, dim = self, 0
    for k in key:
        if isinstance(k, slice):
            step = 1 if k.step is None else k.step
            out = out._slice(dim, k.start, k.stop, step)
            dim += 1
        elif isinstance(k, _int) or hasattr(k, "__index__") and not isinstance(k, _bool):
            out = out.select(dim, k.__index__())
        else:
            raise TypeError(f"tensor indices must be ints or slices (step > 0), got {k!r}")
    return out


def _array(self: Tensor, dtype: Any = None, copy: Optional[_bool] = None) -> np.ndarray:
    a = self.numpy()
    if dtype is not None and np.dtype(dtype) != a.dtype:
        if copy is False:
            raise ValueError(f"converting a {self.dtype!r} tensor to {np.dtype(dtype)} needs a copy, but copy=False")
        return a.astype(dtype)
    return a.copy() if copy else a


def _repr(self: Tensor) -> str:
    try:
        host = self if self.device.type == "cpu" else self.cpu()
        data = (host if self.dtype != bfloat16 else host.to(float32)).numpy()
        body = np.array2string(data, separator=", ", prefix="tensor(", threshold=200)
    except Exception as e:  # noqa: BLE001 - a repr must not raise (no CUDA device, ...)
        body = f"<{type(e).__name__}: {e}>"
    extra = f", dtype={self.dtype!r}" if self.dtype not in (float32, int64, _core.dtype_bool) else ""
    if self.device.type != "cpu":
        extra += f", device='{self.device}'"
    return f"tensor({body}{extra})"


def _tolist(self: Tensor) -> Any:
    host = self if self.device.type == "cpu" else self.cpu()
    return (host.to(float32) if self.dtype == bfloat16 else host).numpy().tolist()


def _item(self: Tensor) -> Any:
    if self.numel() != 1:
        raise ValueError(f"item() needs a tensor with one element, this one has {self.numel()}")
    return _tolist(self.reshape(()))


Tensor.to = _tensor_to
Tensor.__getitem__ = _index
Tensor.__array__ = _array
Tensor.__repr__ = _repr
Tensor.tolist = _tolist
Tensor.item = _item
Tensor.__array_priority__ = 1000

bool = _core.dtype_bool  # noqa: A001 - gpufleet.bool, as torch.bool
uint8 = _core.dtype_uint8
int8 = _core.dtype_int8
int16 = _core.dtype_int16
int32 = _core.dtype_int32
int64 = _core.dtype_int64
float16 = _core.dtype_float16
bfloat16 = _core.dtype_bfloat16
float32 = _core.dtype_float32
float64 = _core.dtype_float64
half = float16
double = float64

from_numpy = _core.from_numpy


def _size(size: tuple) -> Any:
    if len(size) == 1 and not isinstance(size[0], _int):
        return size[0]
    return size


def _infer_fill_dtype(value: Any) -> "dtype":
    if isinstance(value, (_bool, np.bool_)):
        return _core.dtype_bool
    if isinstance(value, (_int, np.integer)):
        return int64
    if isinstance(value, (_float, np.floating)):
        return float32
    raise TypeError(f"fill value must be a bool, int or float, got {value!r} of type {type(value).__name__}")


def empty(*size: Any, dtype: DTypeLike = None, device: DeviceLike = None, pin_memory: _bool = False) -> Tensor:
    """An uninitialised tensor: ``empty(2, 3)`` or ``empty((2, 3), dtype='float16', device='cuda')``."""
    return _core.empty(_size(size), dtype, device, pin_memory)


def full(size: Any, fill_value: Any, *, dtype: DTypeLike = None, device: DeviceLike = None,
         pin_memory: _bool = False) -> Tensor:
    """A tensor filled with ``fill_value``; the dtype follows the value (bool, int64, float32) unless given."""
    return _core.full(size, fill_value, _infer_fill_dtype(fill_value) if dtype is None else dtype, device, pin_memory)


def zeros(*size: Any, dtype: DTypeLike = None, device: DeviceLike = None, pin_memory: _bool = False) -> Tensor:
    return _core.full(_size(size), 0, float32 if dtype is None else dtype, device, pin_memory)


def ones(*size: Any, dtype: DTypeLike = None, device: DeviceLike = None, pin_memory: _bool = False) -> Tensor:
    return _core.full(_size(size), 1, float32 if dtype is None else dtype, device, pin_memory)


def empty_like(t: Tensor, *, dtype: DTypeLike = None, device: DeviceLike = None) -> Tensor:
    """A compact uninitialised tensor with ``t``'s shape, and its dtype and device unless given."""
    return _core.empty(t.shape, t.dtype if dtype is None else dtype, t.device if device is None else device, False)


def zeros_like(t: Tensor, *, dtype: DTypeLike = None, device: DeviceLike = None) -> Tensor:
    return _core.full(t.shape, 0, t.dtype if dtype is None else dtype, t.device if device is None else device, False)


def ones_like(t: Tensor, *, dtype: DTypeLike = None, device: DeviceLike = None) -> Tensor:
    return _core.full(t.shape, 1, t.dtype if dtype is None else dtype, t.device if device is None else device, False)


def full_like(t: Tensor, fill_value: Any, *, dtype: DTypeLike = None, device: DeviceLike = None) -> Tensor:
    return _core.full(t.shape, fill_value, t.dtype if dtype is None else dtype,
                      t.device if device is None else device, False)


def tensor(data: Any, dtype: DTypeLike = None, device: DeviceLike = None, *, pin_memory: _bool = False) -> Tensor:
    """A new tensor holding a copy of ``data``: nested lists, scalars, NumPy arrays, gpufleet tensors or
    anything with ``__dlpack__`` (PyTorch, CuPy, JAX). Without ``dtype``: Python floats give float32,
    ints int64, bools bool (PyTorch's defaults); arrays and tensors keep their dtype."""
    if isinstance(data, Tensor):
        src = data
    elif not isinstance(data, np.ndarray) and hasattr(data, "__dlpack__") and hasattr(data, "__dlpack_device__"):
        src = from_dlpack(data)
    else:
        keep_dtype = isinstance(data, (np.ndarray, np.generic))
        arr = np.asarray(data)
        if arr.dtype.kind == "c":
            raise TypeError(f"complex data ({arr.dtype}) is not supported: gpufleet tensors hold real numbers")
        if arr.dtype == object:
            raise TypeError(f"cannot build a tensor from {type(data).__name__} data of mixed or unsupported types "
                            "(NumPy made an object array): use numbers of one kind, nested in lists of equal length")
        if not keep_dtype and arr.dtype == np.float64:
            arr = arr.astype(np.float32) if dtype is None else arr
        src = from_numpy(np.require(arr, requirements=["W", "A"]))
    out = _core.empty(src.shape, src.dtype if dtype is None else dtype,
                      (src.device if isinstance(data, Tensor) else Device("cpu")) if device is None else device,
                      pin_memory)
    out.copy_(src)
    return out


def cat(tensors: Sequence[Tensor], dim: _int = 0) -> Tensor:
    """Concatenates tensors on one device (mixed devices raise, as in PyTorch)."""
    return _core.cat(list(tensors), dim)


def from_dlpack(x: Any, *, device: DeviceLike = None, copy: Optional[_bool] = None) -> Tensor:
    """A tensor viewing ``x``'s memory without a copy: any object with ``__dlpack__`` (NumPy, PyTorch,
    CuPy, JAX, gpufleet) or a raw DLPack capsule. For CUDA producers the data is made ready on this
    thread's current stream. ``copy=True`` always copies; ``copy=False`` raises ``BufferError`` when a
    copy would be needed (e.g. a read-only NumPy array); ``device`` moves the result (a copy)."""
    if type(x).__name__ == "PyCapsule":
        t = _core._from_dlpack_capsule(x, copy)
    else:
        if not hasattr(x, "__dlpack__"):
            raise TypeError(f"from_dlpack expects an object with __dlpack__ (NumPy, PyTorch, CuPy, JAX arrays) or a "
                            f"DLPack capsule, got {type(x).__name__}")
        dev_type, dev_id = x.__dlpack_device__()
        kwargs: dict = {"max_version": (1, 0)}
        if _int(dev_type) == 2:  # kDLCUDA: the producer makes the data ready on our current stream
            kwargs["stream"] = _core._consumer_stream(_int(dev_id))
        if copy is not None:
            kwargs["copy"] = copy
        try:
            capsule = x.__dlpack__(**kwargs)
        except TypeError:
            # A producer that predates DLPack 1.0 keywords (NumPy < 2.1, PyTorch < 2.3).
            if copy is not None:
                raise
            capsule = x.__dlpack__(stream=kwargs["stream"]) if "stream" in kwargs else x.__dlpack__()
        t = _core._from_dlpack_capsule(capsule, copy)
    if device is not None:
        if copy is False and Device(device) != t.device:
            raise BufferError(f"moving the tensor from {t.device} to {device} needs a copy, but copy=False")
        t = t.to(device)
    return t


# ---- multi-device ----------------------------------------------------------------------------------


def chunk_sizes(n: _int, k: _int) -> list[_int]:
    """DataParallel's chunking of ``n`` items over ``k`` devices: ``ceil(n/k)`` per chunk, so fewer
    chunks than devices when ``n`` is small (``chunk_sizes(5, 4) == [2, 2, 1]``)."""
    return _core.chunk_sizes(n, k)


def scatter(t: Tensor, devices: Sequence[DeviceLike], dim: _int = 0,
            chunk_sizes: Optional[Sequence[_int]] = None) -> list[Tensor]:
    """Splits ``t`` along ``dim`` with DataParallel's rule and moves chunk ``i`` to ``devices[i]``
    (``chunk_sizes`` overrides the rule and must sum to the dimension). Chunks that stay on ``t``'s
    device are views of it."""
    return _core.scatter(t, list(devices), dim, None if chunk_sizes is None else list(chunk_sizes))


def gather(tensors: Sequence[Tensor], device: DeviceLike, dim: _int = 0) -> Tensor:
    """Concatenates tensors from any devices along ``dim`` on ``device`` (DataParallel's output gather)."""
    return _core.gather(list(tensors), device, dim)


def broadcast(t: Tensor, devices: Sequence[DeviceLike]) -> list[Tensor]:
    """A copy of ``t`` on each device (copies even on ``t``'s own device)."""
    return _core.broadcast(t, list(devices))


# ---- current device and streams ---------------------------------------------------------------------


def set_device(d: DeviceLike) -> None:
    """Makes ``d`` (``1``, ``'cuda:1'``, a Device) this thread's current CUDA device: what ``'cuda'``
    without an index means from now on. Checked against the visible devices (simulated ones count)."""
    dev = Device(d)
    if dev.type != "cuda" or dev.index is None:
        raise ValueError(f"set_device expects a CUDA device with an index (e.g. 1 or 'cuda:1'), got {d!r}")
    n = device_count()
    if n == 0:
        raise RuntimeError(f"no CUDA device is available: cannot make {dev} current (0 GPUs visible)")
    if dev.index >= n:
        raise ValueError(f"cannot make {dev} current: {n} GPU{'s are' if n != 1 else ' is'} visible "
                         f"(cuda:0 to cuda:{n - 1})")
    _core._set_device_index(dev.index)


def current_device() -> Device:
    """This thread's current CUDA device (``cuda:0`` unless ``set_device`` changed it)."""
    return Device("cuda", _core._current_device_index())


@contextlib.contextmanager
def device(d: DeviceLike) -> Iterator[Device]:
    """``with gpufleet.device(1): ...`` makes cuda:1 current inside the block and restores the previous
    current device afterwards. ``None`` or a CPU device leaves it unchanged."""
    previous = _core._current_device_index()
    dev = None if d is None else Device(d)
    if dev is not None and dev.type == "cuda":
        set_device(dev if dev.index is not None else previous)
    try:
        yield Device("cuda", _core._current_device_index())
    finally:
        _core._set_device_index(previous)


current_stream = _core.current_stream
default_stream = _core.default_stream
synchronize = _core.synchronize


@contextlib.contextmanager
def stream(s: Optional[Stream]) -> Iterator[Optional[Stream]]:
    """``with gpufleet.stream(s):`` makes ``s`` the current stream of its device in this thread (copies
    and kernels queue on it) and restores the previous one afterwards. ``None`` is a no-op."""
    if s is None:
        yield None
        return
    previous = _core.current_stream(s.device)
    _core._set_current_stream(s)
    try:
        yield s
    finally:
        _core._set_current_stream(previous)


memory_stats = _core.memory_stats
empty_cache = _core.empty_cache
reset_peak_memory_stats = _core.reset_peak_memory_stats


# ---- Module and state dicts -------------------------------------------------------------------------


class StateDictError(ValueError):
    """``load_state_dict`` found missing or unexpected keys or mismatched shapes."""


class IncompatibleKeys(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class Module:
    """A container of named tensors and child modules. ``to()`` moves every tensor in place and
    returns the module itself (PyTorch's ``nn.Module.to``); ``state_dict``/``load_state_dict`` use
    dotted names (``"linears.0.weight"``)."""

    def __init__(self) -> None:
        object.__setattr__(self, "_tensors", {})
        object.__setattr__(self, "_modules", {})

    def __setattr__(self, name: str, value: Any) -> None:
        tensors, modules = self.__dict__.get("_tensors"), self.__dict__.get("_modules")
        if tensors is None:
            raise AttributeError("Module.__init__() must be called before assigning attributes")
        if isinstance(value, Tensor):
            modules.pop(name, None)
            self.__dict__.pop(name, None)
            tensors[name] = value
        elif isinstance(value, Module):
            tensors.pop(name, None)
            self.__dict__.pop(name, None)
            modules[name] = value
        elif name in tensors or name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to {name!r}: it holds a "
                                f"{'tensor' if name in tensors else 'module'} (expected a Tensor, a Module or None)")
            (tensors if name in tensors else modules)[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for store in ("_tensors", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for store in (self._tensors, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def register_tensor(self, name: str, t: Optional[Tensor]) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"tensor name must be a non-empty string without dots, got {name!r}")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"register_tensor expects a gpufleet.Tensor or None, got {type(t).__name__}")
        self._modules.pop(name, None)
        self._tensors[name] = t

    def add_module(self, name: str, module: Optional["Module"]) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"module name must be a non-empty string without dots, got {name!r}")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module expects a gpufleet.Module or None, got {type(module).__name__}")
        self._tensors.pop(name, None)
        self._modules[name] = module

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self) -> Iterator["Module"]:
        yield from (m for _, m in self.named_children())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        yield from (m for _, m in self.named_modules())

    def named_tensors(self, prefix: str = "", recurse: _bool = True) -> Iterator[tuple[str, Tensor]]:
        for name, t in self._tensors.items():
            if t is not None:
                yield (f"{prefix}.{name}" if prefix else name), t
        if recurse:
            for name, child in self.named_children():
                yield from child.named_tensors(f"{prefix}.{name}" if prefix else name)

    def tensors(self, recurse: _bool = True) -> Iterator[Tensor]:
        yield from (t for _, t in self.named_tensors(recurse=recurse))

    def to(self, *args: Any, device: Any = None, dtype: Any = None, non_blocking: _bool = False) -> "Module":
        """Moves (and, for floating-point tensors, converts) every tensor in place; returns ``self``."""
        device, dtype, non_blocking, _ = _parse_to_args(args, device, dtype, non_blocking, False)
        target = None if dtype is None else as_dtype(dtype)
        if target is not None and not target.is_floating_point:
            raise TypeError(f"Module.to only accepts floating point dtypes, got {target!r}")
        for m in list(self.modules()):
            for name, t in list(m._tensors.items()):
                if t is not None:
                    m._tensors[name] = t._to(device, target if t.dtype.is_floating_point else None,
                                             non_blocking, False)
        return self

    def cpu(self) -> "Module":
        return self.to("cpu")

    def cuda(self, device: DeviceLike = None) -> "Module":
        return self.to("cuda" if device is None else Device("cuda", Device(device).index))

    def state_dict(self, prefix: str = "") -> "collections.OrderedDict[str, Tensor]":
        """The module's tensors by dotted name (the tensors themselves, not copies)."""
        return collections.OrderedDict(self.named_tensors(prefix.rstrip(".")))

    def load_state_dict(self, state_dict: Mapping, strict: _bool = True) -> IncompatibleKeys:
        """Copies ``state_dict``'s values (gpufleet tensors, NumPy arrays, PyTorch tensors, anything with
        ``__dlpack__``) into this module's tensors in place, converting dtype and device. With
        ``strict`` any missing or unexpected key is an error; a shape mismatch always is. Nothing is
        copied when there is an error."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        own = dict(self.named_tensors())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
        sources = {}
        for k, t in own.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            src = v if isinstance(v, Tensor) else (from_dlpack(v) if hasattr(v, "__dlpack__") else tensor(v))
            if tuple(src.shape) != tuple(t.shape):
                errors.append(f"size mismatch for {k}: copying a tensor with shape {tuple(src.shape)} from the "
                              f"state dict, the shape in the current module is {tuple(t.shape)}.")
            sources[k] = src
        if errors:
            hint = ""
            for p in ("module.",):
                if unexpected and all(isinstance(k, str) and k.startswith(p) for k in unexpected):
                    hint = (f"\n\thint: every unexpected key starts with {p!r} (a DataParallel/DDP checkpoint): "
                            f"load gpufleet.strip_prefix(state_dict, {p!r})")
                elif missing and all(isinstance(k, str) and k.startswith(p) for k in missing):
                    hint = (f"\n\thint: the module expects {p!r} prefixes the state dict lacks: load "
                            f"gpufleet.add_prefix(state_dict, {p!r})")
            raise StateDictError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                                 + "\n\t".join(errors) + hint)
        for k, src in sources.items():
            own[k].copy_(src)
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self) -> str:
        lines = [f"  {n}: {t}" for n, t in self._tensors.items()]
        for n, m in self._modules.items():
            lines.append(f"  ({n}): " + repr(m).replace("\n", "\n  "))
        return f"{type(self).__name__}(" + ("\n" + "\n".join(lines) + "\n" if lines else "") + ")"


def _new_mapping_like(m: Mapping) -> Any:
    if isinstance(m, dict):
        try:
            return type(m)()
        except TypeError:
            pass
    return collections.OrderedDict()


def _rename(state_dict: Mapping, rename, what: str) -> Any:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{what} expects a mapping (a state dict), got {type(state_dict).__name__}")
    out = _new_mapping_like(state_dict)
    origin = {}
    for k, v in state_dict.items():
        nk = rename(k)
        if nk in out:
            raise ValueError(f"{what}: keys {origin[nk]!r} and {k!r} both become {nk!r}")
        out[nk] = v
        origin[nk] = k
    meta = getattr(state_dict, "_metadata", None)
    if isinstance(meta, Mapping):  # PyTorch keeps per-module versions here, keyed by module path
        new_meta = collections.OrderedDict()
        for k, v in meta.items():
            new_meta[rename(k + ".").rstrip(".") if isinstance(k, str) else k] = v
        try:
            out._metadata = new_meta
        except AttributeError:
            pass
    return out


def strip_prefix(state_dict: Mapping, prefix: str = "module.") -> Any:
    """A copy of ``state_dict`` (any mapping, PyTorch state dicts included) with ``prefix`` removed from
    the keys that have it: the fix for DataParallel/DDP checkpoints' ``module.`` keys. Raises
    ``ValueError`` if two keys would collide."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    return _rename(state_dict, lambda k: k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k,
                   "strip_prefix")


def add_prefix(state_dict: Mapping, prefix: str = "module.") -> Any:
    """A copy of ``state_dict`` with ``prefix`` added to every key (to load a plain checkpoint into a
    wrapped model)."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    return _rename(state_dict, lambda k: prefix + k if isinstance(k, str) else k, "add_prefix")
