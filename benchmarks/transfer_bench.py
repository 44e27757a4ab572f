"""Transfers (tensors): ours vs a baseline measured in the same run, as a table of ratios.

CPU rows (always): zero-copy NumPy/DLPack exchange vs NumPy's own views, host dtype conversion and
strided copies vs ndarray.astype / np.ascontiguousarray, the identity `.to()` latency.
GPU rows (a CUDA build on a machine with a GPU): host->device and device->host bandwidth for 1 KiB
to 1 GiB, pageable vs pinned, against `torch.Tensor.to`/`copy_` (when PyTorch is installed) and
against the peak of a plain `cudaMemcpy` from pinned memory (libcudart through ctypes); small-tensor
`.to()` latency against PyTorch's. Without a GPU those rows say why they were not measured.

    PYTHONPATH=build/cuda/stage python benchmarks/transfer_bench.py [--quick] [--max-size 1GiB]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import sys
import time

import numpy as np

import gpufleet


def best_of(fn, repeat: int, number: int) -> float:
    """Seconds per call: the best of `repeat` timings of `number` calls (less noise than a mean)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def row(name: str, ours: float, base: float, unit: str, higher_is_better: bool) -> None:
    ratio = (ours / base) if higher_is_better else (base / ours)
    print(f"{name:<46} {ours:>12.3f} {base:>12.3f} {unit:<6} {ratio:>7.2f}x")


def header(title: str, base: str) -> None:
    print(f"\n{title}\n{'case':<46} {'gpufleet':>12} {base:>12} {'unit':<6} {'ratio':>8}")


def sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 8 if s < (1 << 20) else 4
    return out


def fmt(n: int) -> str:
    return gpufleet.format_memory_size(n).replace(" ", "")


def cpu_rows(quick: bool) -> None:
    rng = np.random.default_rng(0)
    header("CPU: zero-copy exchange (per call; ratio > 1: gpufleet faster)", "NumPy")
    a = rng.standard_normal(1 << 16).astype(np.float32)
    n = 2000 if quick else 20000
    t = gpufleet.from_numpy(a)
    row("from_numpy(a).numpy() vs a.view()", best_of(lambda: gpufleet.from_numpy(a).numpy(), 5, n) * 1e6,
        best_of(lambda: a.view(), 5, n) * 1e6, "us", False)
    row("np.from_dlpack(tensor) vs np.from_dlpack(ndarray)", best_of(lambda: np.from_dlpack(t), 5, n) * 1e6,
        best_of(lambda: np.from_dlpack(a), 5, n) * 1e6, "us", False)
    row("gpufleet.from_dlpack(ndarray) vs np.from_dlpack", best_of(lambda: gpufleet.from_dlpack(a), 5, n) * 1e6,
        best_of(lambda: np.from_dlpack(a), 5, n) * 1e6, "us", False)
    row("t.to('cpu') (identity) vs a.astype(copy=False)", best_of(lambda: t.to("cpu"), 5, n) * 1e6,
        best_of(lambda: a.astype(np.float32, copy=False), 5, n) * 1e6, "us", False)

    header("CPU: dtype conversion and strided copies (GB/s of output; ratio > 1: gpufleet faster)", "NumPy")
    for size in sizes(1 << 10, (16 if quick else 64) << 20):
        count = size // 4
        x = rng.standard_normal(count).astype(np.float32)
        tx = gpufleet.from_numpy(x)
        reps = max(3, min(200, (64 << 20) // size))
        for dst in ("float16", "float64", "int32"):
            out_bytes = count * np.dtype(dst).itemsize
            ours = best_of(lambda: tx.to(dst), 3, reps)
            base = best_of(lambda: x.astype(dst), 3, reps)
            row(f"float32->{dst} {fmt(size)}", out_bytes / ours / 1e9, out_bytes / base / 1e9, "GB/s", True)
        side = int(np.sqrt(count))
        m = x[: side * side].reshape(side, side)
        tm = gpufleet.from_numpy(m)
        ours = best_of(lambda: tm.transpose(0, 1).contiguous(), 3, reps)
        base = best_of(lambda: np.ascontiguousarray(m.T), 3, reps)
        row(f"transpose().contiguous() {fmt(side * side * 4)}", side * side * 4 / ours / 1e9,
            side * side * 4 / base / 1e9, "GB/s", True)


# ---- GPU --------------------------------------------------------------------------------------------


def load_cudart():
    names = [ctypes.util.find_library("cudart")] + sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    try:
        import nvidia.cuda_runtime  # noqa: F401 - the PyTorch wheels' runtime

        names += sorted(glob.glob(os.path.join(os.path.dirname(nvidia.cuda_runtime.__file__), "lib", "libcudart.so*")))
    except ImportError:
        pass
    for n in names:
        if n:
            try:
                return ctypes.CDLL(n)
            except OSError:
                continue
    return None


class RawCuda:
    """cudaMemcpy from pinned memory through libcudart: the peak our copies are measured against."""

    H2D, D2H = 1, 2

    def __init__(self, lib, nbytes: int):
        self.lib, self.n = lib, nbytes
        self.host, self.dev = ctypes.c_void_p(), ctypes.c_void_p()
        assert lib.cudaHostAlloc(ctypes.byref(self.host), ctypes.c_size_t(nbytes), 0) == 0
        assert lib.cudaMalloc(ctypes.byref(self.dev), ctypes.c_size_t(nbytes)) == 0

    def copy(self, kind: int) -> None:
        dst, src = (self.dev, self.host) if kind == self.H2D else (self.host, self.dev)
        assert self.lib.cudaMemcpy(dst, src, ctypes.c_size_t(self.n), kind) == 0

    def close(self) -> None:
        self.lib.cudaFreeHost(self.host)
        self.lib.cudaFree(self.dev)


def gpu_rows(quick: bool, max_size: int) -> None:
    torch = None
    try:
        import torch as _torch

        torch = _torch if _torch.cuda.is_available() else None
    except ImportError:
        pass
    lib = load_cudart()
    dev = "cuda:0"
    header("GPU: bandwidth (GB/s; ratio = gpufleet / baseline)", "baseline")
    for size in sizes(1 << 10, max_size):
        count = size // 4
        reps = max(3, min(100, (256 << 20) // size))
        host = gpufleet.empty(count, dtype="float32")
        pinned = gpufleet.empty(count, dtype="float32", pin_memory=True)
        d = gpufleet.empty(count, dtype="float32", device=dev)

        def ours(dst, src):
            def f():
                dst.copy_(src)
                gpufleet.synchronize()
            return f

        for label, src in (("pageable", host), ("pinned", pinned)):
            h2d = size / best_of(ours(d, src), 3, reps) / 1e9
            d2h = size / best_of(ours(src, d), 3, reps) / 1e9
            if torch is not None:
                th = torch.empty(count, dtype=torch.float32, pin_memory=(label == "pinned"))
                td = torch.empty(count, dtype=torch.float32, device=dev)
                tb_h2d = size / best_of(lambda: (td.copy_(th), torch.cuda.synchronize()), 3, reps) / 1e9
                tb_d2h = size / best_of(lambda: (th.copy_(td), torch.cuda.synchronize()), 3, reps) / 1e9
                row(f"H2D {label} {fmt(size)} vs torch copy_", h2d, tb_h2d, "GB/s", True)
                row(f"D2H {label} {fmt(size)} vs torch copy_", d2h, tb_d2h, "GB/s", True)
            else:
                print(f"H2D/D2H {label} {fmt(size)}: {h2d:.3f} / {d2h:.3f} GB/s (PyTorch not installed: no torch row)")
            if label == "pinned" and lib is not None:
                raw = RawCuda(lib, size)
                r_h2d = size / best_of(lambda: raw.copy(RawCuda.H2D), 3, reps) / 1e9
                r_d2h = size / best_of(lambda: raw.copy(RawCuda.D2H), 3, reps) / 1e9
                raw.close()
                row(f"H2D pinned {fmt(size)} vs cudaMemcpy peak", h2d, r_h2d, "GB/s", True)
                row(f"D2H pinned {fmt(size)} vs cudaMemcpy peak", d2h, r_d2h, "GB/s", True)
        del host, pinned, d
        gpufleet.empty_cache()
    if lib is None:
        print("cudaMemcpy peak: not measured (libcudart not found for ctypes)")

    header("GPU: small-tensor .to() latency (us per call; ratio > 1: gpufleet faster)", "torch")
    small = gpufleet.ones(4)
    n = 500 if quick else 5000
    ours_lat = best_of(lambda: small.to(dev), 5, n) * 1e6
    back = small.to(dev)
    ours_back = best_of(lambda: back.to("cpu"), 5, n) * 1e6
    if torch is not None:
        ts = torch.ones(4)
        tb = ts.to(dev)
        row("ones(4).to('cuda:0')", ours_lat, best_of(lambda: ts.to(dev), 5, n) * 1e6, "us", False)
        row("cuda ones(4).to('cpu')", ours_back, best_of(lambda: tb.to("cpu"), 5, n) * 1e6, "us", False)
    else:
        print(f"ones(4).to('cuda:0'): {ours_lat:.2f} us, back to cpu: {ours_back:.2f} us (PyTorch not installed)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes")
    p.add_argument("--max-size", default="1GiB", help="largest GPU transfer (default 1GiB)")
    args = p.parse_args()
    print(f"gpufleet {gpufleet.__version__}; NumPy {np.__version__}; Python {sys.version.split()[0]}; "
          f"CUDA compiled in: {gpufleet.build_info()['cuda']}")
    cpu_rows(args.quick)
    topo = gpufleet.topology()
    if not gpufleet.build_info()["cuda"]:
        print("\nGPU rows: not measured: gpufleet was built without CUDA")
    elif topo.source in ("none", "simulated") or gpufleet.device_count() == 0:
        print("\nGPU rows: not measured: no GPU on this machine")
    else:
        gpu_rows(args.quick, gpufleet.parse_memory_size(args.max_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
