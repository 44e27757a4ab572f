"""gpufleet.onnx: ONNX Runtime execution-provider lists, built the way seed 001 recommends.

``providers("cuda:1", cache_dir="/cache/trt")`` returns, for ``onnxruntime.InferenceSession(...,
providers=...)``::

    [("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True,
                                    "trt_engine_cache_enable": True, "trt_engine_cache_path": "/cache/trt",
                                    "trt_timing_cache_enable": True, "trt_timing_cache_path": "/cache/trt",
                                    "trt_max_workspace_size": 2 GiB}),
     ("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kNextPowerOfTwo",
                                "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}),
     "CPUExecutionProvider"]

TensorRT first (its engines are cached so a restart does not rebuild them), CUDA next, CPU last as
the fallback. The list is validated against ``onnxruntime.get_available_providers()`` when
onnxruntime is importable: a provider the installed build lacks is left out (``strict=False``) or
raises ``ValueError`` naming it and what is available (``strict=True``). Without onnxruntime the full
list is returned unvalidated (``validated_against`` tells which happened), or, with ``strict=True``,
``MissingExtraError`` asks for the ``onnx`` extra.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from . import _extras
from ._devices import as_device, parse_memory_size

__all__ = ["providers", "available_providers"]

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def available_providers() -> Optional[list[str]]:
    """``onnxruntime.get_available_providers()``, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


class ProviderList(list):
    """A list of providers for ``InferenceSession(providers=...)``, plus what it was checked against
    (``validated_against``: the available providers, or None when onnxruntime is absent) and which
    requested providers were left out (``dropped``)."""

    validated_against: Optional[list[str]] = None
    dropped: list[str]


def providers(device: Any = "cuda", *, tensorrt: bool = True, fp16: bool = True,
              cache_dir: Optional[Union[str, os.PathLike]] = None, workspace: Union[int, str] = "2GiB",
              gpu_mem_limit: Optional[Union[int, str]] = None, cudnn_conv_algo_search: str = "EXHAUSTIVE",
              strict: bool = False, available: Optional[Sequence[str]] = None) -> ProviderList:
    """Execution providers for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, an int, a
    ``gpufleet.Device``...): TensorRT (``tensorrt=True``; FP16 with ``fp16``; engine and timing caches
    in ``cache_dir``, created if missing), then CUDA, then CPU; only CPU for a CPU device.
    ``available`` overrides the providers to validate against (default: the installed onnxruntime's).
    """
    dev = as_device(device)
    if cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ValueError(f"cudnn_conv_algo_search must be 'EXHAUSTIVE', 'HEURISTIC' or 'DEFAULT', "
                         f"got {cudnn_conv_algo_search!r}")
    wanted: list = []
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else 0
        if tensorrt:
            trt: dict = {
                "device_id": index,
                "trt_fp16_enable": bool(fp16),
                "trt_max_workspace_size": parse_memory_size(workspace, name="workspace"),
            }
            if cache_dir is not None:
                path = os.fspath(cache_dir)
                os.makedirs(path, exist_ok=True)
                trt.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": path,
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": path})
            wanted.append((TENSORRT, trt))
        cuda: dict = {"device_id": index, "arena_extend_strategy": "kNextPowerOfTwo",
                      "cudnn_conv_algo_search": cudnn_conv_algo_search, "do_copy_in_default_stream": True}
        if gpu_mem_limit is not None:
            cuda["gpu_mem_limit"] = parse_memory_size(gpu_mem_limit, name="gpu_mem_limit")
        wanted.append((CUDA, cuda))
    elif dev.type != "cpu":  # pragma: no cover - Device only knows cpu and cuda today
        raise ValueError(f"no ONNX Runtime providers for device {dev}")
    wanted.append(CPU)

    if strict and available is None:  # validation asked for: onnxruntime is needed (Note [Optional extras])
        _extras.require("onnxruntime", "onnx", "gpufleet.onnx.providers(strict=True)")
    avail = list(available) if available is not None else available_providers()
    out = ProviderList()
    out.validated_against = avail
    out.dropped = []
    for p in wanted:
        name = p[0] if isinstance(p, tuple) else p
        if avail is not None and name not in avail:
            out.dropped.append(name)
            continue
        out.append(p)
    if out.dropped and strict:
        raise ValueError(f"onnxruntime lacks the provider(s) {out.dropped} requested for {dev}; available: {avail}")
    if not out:
        raise ValueError(f"none of the providers {[p[0] if isinstance(p, tuple) else p for p in wanted]} is "
                         f"available; onnxruntime offers {avail}")
    return out
