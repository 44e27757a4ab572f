"""gpufleet.kernels on a CUDA device (needs a GPU machine, CuPy; PyTorch optional), measured in one run.

- the chain on a batch of 64 depth images vs the seed chain's CPU throughput (images/s);
- gaussian_blur vs cupyx.scipy.ndimage.gaussian_filter(sigma=7, radius=35, mode="nearest") and a
  PyTorch conv2d blur;
- each kernel's achieved bandwidth vs the device's measured device-to-device copy bandwidth.
Exits 0 with a message when no CUDA device or CuPy is available.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np

import gpufleet
from gpufleet import kernels as K


def gpu_time(cp, fn, reps=20):
    fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / reps  # ms


def main():
    if not gpufleet.build_info()["cuda"] or gpufleet.topology().source in ("none", "simulated"):
        print("kernels_gpu: no CUDA device (or a CPU-only build): nothing measured")
        return 0
    try:
        import cupy as cp
        import cupyx.scipy.ndimage as cnd
    except ImportError:
        print("kernels_gpu: CuPy is not installed: nothing measured")
        return 0
    warnings.filterwarnings("ignore")
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from kernels_cpu import seed_chain, synthetic_depth, timed

    rng = np.random.default_rng(0)
    dev = cp.cuda.Device()
    print(f"device {dev.id}: {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}")
    nbytes = 1 << 30
    a, b = cp.empty(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    copy_ms = gpu_time(cp, lambda: b.__setitem__(slice(None), a), reps=10)
    copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s, read + write
    print(f"device copy bandwidth: {copy_bw:.0f} GB/s")
    for h, w in [(512, 1024), (1024, 2048)]:
        host = np.stack([synthetic_depth(rng, h, w) for _ in range(64)])
        depth = cp.asarray(host)
        ms = gpu_time(cp, lambda: K.congestion_score(depth))
        seed_ms = timed(lambda: seed_chain(host[0], rng), 3)
        print(f"chain batch 64 {h}x{w}: {64 / ms * 1e3:.0f} img/s vs seed CPU {1e3 / seed_ms:.1f} img/s: "
              f"{(64 / ms) / (1 / seed_ms):.0f}x; reads {host.nbytes / ms / 1e6:.0f} GB/s of depth")
        x = cp.asarray((rng.random((64, h, w)) * 255).astype(np.float32))
        ours = gpu_time(cp, lambda: K.gaussian_blur(x, 71, 7))
        base = gpu_time(cp, lambda: cnd.gaussian_filter(x, sigma=(0, 7, 7), radius=(0, 35, 35), mode="nearest"))
        print(f"blur 64x{h}x{w} f32: ours {ours:.2f} ms, cupyx {base:.2f} ms ({base / ours:.2f}x); "
              f"{3 * x.nbytes / ours / 1e6:.0f} GB/s moved (in, scratch, out) = {3 * x.nbytes / ours / 1e6 / copy_bw:.0%} of copy")
        try:
            import torch
            import torch.nn.functional as F

            t = torch.from_dlpack(x).unsqueeze(1)
            k1 = torch.tensor(cv2_kernel(), device=t.device)
            kx, ky = k1.view(1, 1, 1, 71), k1.view(1, 1, 71, 1)

            def torch_blur():
                p = F.pad(t, (35, 35, 35, 35), mode="replicate")
                return F.conv2d(F.conv2d(p, kx), ky)

            tb = gpu_time(cp, torch_blur)
            print(f"blur 64x{h}x{w} f32: PyTorch conv2d {tb:.2f} ms ({tb / ours:.2f}x)")
        except ImportError:
            print("PyTorch not installed: conv2d blur not measured")
        u = cp.asarray(host)
        cm = gpu_time(cp, lambda: K.canny(u, 100, 200))
        print(f"canny 64x{h}x{w}: {cm:.2f} ms, {u.nbytes * 6 / cm / 1e6:.0f} GB/s (u8 in, int32 state r/w, u8 out)")
    return 0


def cv2_kernel():
    import cv2

    return cv2.getGaussianKernel(71, 7, ktype=cv2.CV_32F).ravel().tolist()


if __name__ == "__main__":
    sys.exit(main())
