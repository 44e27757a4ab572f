"""Devices: parsing, discovery (NVML, no CUDA context), CUDA_VISIBLE_DEVICES, selection, simulation,
seeding. The logic lives in the C++ core (csrc/device); this module adapts Python arguments."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from . import _core, _display

Device = _core.Device
DeviceInfo = _core.DeviceInfo
GpuProcess = _core.GpuProcess
Topology = _core.Topology
CudaError = _core.CudaError
DeviceSelectionError = _core.DeviceSelectionError
DeviceSelectionTimeout = _core.DeviceSelectionTimeout
as_device = _core.as_device

class DeviceList(list):
    """What ``devices()`` returns: a list of ``DeviceInfo`` that shows itself as a table."""

    def __repr__(self) -> str:
        return _display.devices_repr(self)

    def _repr_html_(self) -> str:
        return _display.devices_html(self)


MemorySize = Union[int, str]
DeviceLike = Union[Device, str, int, Any]

__all__ = [
    "Device",
    "DeviceInfo",
    "DeviceList",
    "GpuProcess",
    "Topology",
    "CudaError",
    "DeviceSelectionError",
    "DeviceSelectionTimeout",
    "as_device",
    "build_info",
    "device_count",
    "devices",
    "is_available",
    "topology",
    "parse_memory_size",
    "format_memory_size",
    "parse_visible_devices",
    "select_devices",
    "simulate_gpus",
    "update_simulated_gpu",
    "manual_seed",
    "initial_seed",
    "seed_everything",
]


def device_count() -> int:
    """Number of visible GPUs (CUDA_VISIBLE_DEVICES applied); 0 without a GPU or driver (no error).
    A malformed ``GPUFLEET_SIMULATED_GPUS`` raises ``ValueError``."""
    return _core.device_count()


def is_available() -> bool:
    """True when at least one GPU is visible (a simulated one counts: see ``simulate_gpus``)."""
    return device_count() > 0


def devices() -> DeviceList:
    """The visible GPUs in CUDA ordinal order, read through NVML without creating a CUDA context
    (a list of ``DeviceInfo``, shown as a table in a REPL or a notebook)."""
    return DeviceList(_core.devices())


def topology() -> Topology:
    """Everything discovery knows: all physical GPUs, the visible ones, the driver, notes."""
    return _core.discover()


def build_info() -> dict:
    """How this gpufleet was built: CUDA compiled in, its architectures and runtime version."""
    b = _core.build_info()
    return {
        "version": _core.__version__,
        "cuda": b.cuda,
        "cuda_architectures": [a for a in b.cuda_architectures.split(",") if a],
        "cuda_runtime_version": b.cuda_runtime_version,
    }


def parse_memory_size(size: MemorySize, *, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"`` or ``"1.5G"``."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string like '4GiB', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"{name} must be a non-negative number of bytes, got {size}")
        if size > 2**64 - 1:
            raise ValueError(f"{name}: {size} bytes is too large; at most 18446744073709551615 bytes (16 EiB)")
        return size
    # surrogateescape: text from the command line or a file may hold bytes that are not UTF-8; the parser
    # names them in its error instead of pybind11 refusing the argument.
    return _core.parse_memory_size(size.encode("utf-8", "surrogateescape"))


format_memory_size = _core.format_memory_size


def parse_visible_devices(value: Optional[str], gpus: Union[int, Sequence[Any]]) -> list[int]:
    """Applies a ``CUDA_VISIBLE_DEVICES`` value with CUDA's exact rules.

    ``value`` is the variable's value (``None`` = unset: every GPU; ``""``: none). ``gpus`` is the
    GPUs in enumeration order: a count, or a sequence of ``DeviceInfo`` objects or UUID strings.
    Returns the positions in ``gpus`` of the visible devices, in the order CUDA numbers them.
    Enumeration stops at the first invalid entry (``"0,2,-1,1"`` makes 0 and 2 visible).
    """
    if isinstance(gpus, bool):
        raise TypeError(f"gpus must be a count or a sequence of GPUs, got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 0:
            raise ValueError(f"gpus must be a non-negative count, got {gpus}")
        uuids = [f"GPU-00000000-0000-4000-8000-{i:012x}" for i in range(gpus)]
    else:
        uuids = [g.uuid if isinstance(g, DeviceInfo) else str(g) for g in gpus]
    if value is not None and not isinstance(value, str):
        raise TypeError(f"value must be a string or None (unset), got {value!r}")
    return [gpu for gpu, _mig in _core.parse_visible_devices(value, uuids)]


def _ordinals(exclude: Iterable[DeviceLike]) -> list[int]:
    out = []
    for d in exclude:
        dev = as_device(d)
        if dev.type != "cuda" or dev.index is None:
            raise ValueError(f"exclude takes CUDA devices with an index (e.g. 1 or 'cuda:1'), got {d!r}")
        out.append(dev.index)
    return out


def select_devices(
    n: int = 1,
    *,
    min_free_memory: Optional[MemorySize] = None,
    max_utilization: Optional[float] = None,
    order: str = "free_memory",
    exclude: Iterable[DeviceLike] = (),
    wait: bool = False,
    timeout: Optional[float] = None,
    poll_interval: float = 1.0,
) -> list[Device]:
    """Chooses ``n`` visible GPUs, best first.

    A device qualifies when its free memory is at least ``min_free_memory`` (bytes or ``"4GiB"``)
    and its utilisation is at most ``max_utilization`` percent. ``order`` is ``"free_memory"`` (most
    free first), ``"utilization"`` (least busy first) or ``"index"``. When fewer than ``n`` qualify,
    raises ``DeviceSelectionError`` listing every device and why it was rejected; with ``wait=True``
    polls every ``poll_interval`` seconds until enough qualify, raising ``DeviceSelectionTimeout``
    after ``timeout`` seconds (``None``: wait forever).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {n!r}")
    mem = None if min_free_memory is None else parse_memory_size(min_free_memory, name="min_free_memory")
    if max_utilization is not None and (isinstance(max_utilization, bool) or not isinstance(max_utilization, (int, float))):
        raise TypeError(f"max_utilization must be a percentage (0-100), got {max_utilization!r}")
    if timeout is not None and not wait:
        raise ValueError("timeout only applies with wait=True")
    chosen = _core.select_devices(
        n, mem, None if max_utilization is None else float(max_utilization), order, _ordinals(exclude),
        bool(wait), None if timeout is None else float(timeout), float(poll_interval)
    )
    return [Device("cuda", i) for i in chosen]


_sim_stack: list[Optional[str]] = []
_sim_current: Optional[str] = None


class _SimulationHandle:
    """Returned by ``simulate_gpus``; as a context manager it restores the previous simulation."""

    def __init__(self, previous: Optional[str]):
        self._previous = previous

    def __enter__(self) -> "_SimulationHandle":
        return self

    def __exit__(self, *exc) -> None:
        _install(self._previous)


def _install(spec: Optional[str]) -> None:
    global _sim_current
    if spec is None:
        _core.clear_simulated_gpus()
    else:
        _core.set_simulated_gpus(spec)
    _sim_current = spec


def simulate_gpus(spec: Union[None, int, str, Sequence[dict]]) -> _SimulationHandle:
    """Presents GPUs that are not there (the API twin of ``GPUFLEET_SIMULATED_GPUS``).

    ``spec`` is a count (``4``: four idle 80 GiB GPUs), a list of dicts with the optional keys
    ``name``, ``total_memory``, ``free_memory`` (bytes or ``"40GiB"``), ``utilization``,
    ``processes``, ``compute_capability``, ``uuid``, or the same as a JSON string; ``None`` removes
    the API setting (the environment variable applies again). Usable as a context manager::

        with gpufleet.simulate_gpus([{"free_memory": "10GiB"}, {}]):
            gpufleet.select_devices(min_free_memory="20GiB")
    """
    previous = _sim_current
    if spec is None:
        text = None
    elif isinstance(spec, bool):
        raise TypeError(f"spec must be a count, a list of dicts, a JSON string or None, got {spec!r}")
    elif isinstance(spec, int):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec
    elif isinstance(spec, Sequence):
        text = json.dumps(list(spec))
    else:
        raise TypeError(f"spec must be a count, a list of dicts, a JSON string or None, got {spec!r}")
    _install(text)
    return _SimulationHandle(previous)


def update_simulated_gpu(
    index: int,
    *,
    free_memory: Optional[MemorySize] = None,
    utilization: Optional[int] = None,
    processes: Optional[Sequence[Union[int, tuple]]] = None,
) -> None:
    """Changes the live state of simulated GPU ``index`` (physical order): free memory,
    utilisation, processes (pids, or ``(pid, used_memory)`` pairs)."""
    mem = None if free_memory is None else parse_memory_size(free_memory, name="free_memory")
    procs = None
    if processes is not None:
        procs = []
        for p in processes:
            if isinstance(p, tuple):
                procs.append(_core.make_gpu_process(int(p[0]), parse_memory_size(p[1], name="used_memory")))
            else:
                procs.append(_core.make_gpu_process(int(p)))
    _core.update_simulated_gpu(index, mem, utilization, procs)


def manual_seed(seed: int) -> None:
    """Seeds gpufleet's own random streams (used by sampling kernels such as k-means++)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _core.manual_seed(seed & 0xFFFFFFFFFFFFFFFF)


def initial_seed() -> int:
    """The seed gpufleet's default stream was last seeded with."""
    return _core.initial_seed()


def seed_everything(seed: int) -> int:
    """Seeds Python's ``random``, NumPy's global generator, gpufleet, and PyTorch and CuPy when they
    are already imported; sets ``PYTHONHASHSEED`` for child processes. Returns ``seed``."""
    manual_seed(seed)
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed & 0xFFFFFFFF)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.random.seed(seed)
    return seed
