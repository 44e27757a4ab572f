"""Seed 001 (FaceFusion GPU-utilisation tuning) done the gpufleet way: a video's frames through
decode -> detect -> batched "swap" model -> paste -> encode as one pipeline, swept over batch sizes,
with the seed's table (GPU utilisation, ms per frame, FPS) measured in this run instead of quoted, and
the stage that limits each configuration named.

The seed tunes ONNX Runtime (TensorRT FP16 with an engine cache, then CUDA, then CPU), enlarges the
container's /dev/shm, and splits the chain into concurrent stages so that the GPU never waits for
decoding or encoding; batch 4 is its sweet spot for inswapper_128. Here:

    decode (cv2.VideoCapture: the source)
      -> map(detect the face box, 2 threads) -> map(crop to 128x128, 2 threads)
      -> batch(B, max_delay) -> gpu(the swap model, one replica per GPU; the CPU when there is none)
      -> unbatch() -> map(paste back, 2 threads) -> sink(cv2.VideoWriter), in frame order

against the seed's "default" row: the same steps one frame at a time in one loop. The model: an ONNX
file given with --model (NCHW float32 input, same-shape output) runs in ONNX Runtime with
``gpufleet.onnx.providers(device)`` (TensorRT FP16 with an engine cache, CUDA, CPU: whichever are
installed); without one, PyTorch (a small fixed conv net, on the GPU when there is one) or, on a
machine without a GPU, a SIMULATED DEVICE: a stand-in with the time profile of a device call (a fixed
cost per call, for the launch and the transfers, plus a cost per frame, spent sleeping outside the
GIL as a GPU call is, ``--device-call-ms`` and ``--device-ms``), the same stand-in on both sides of the
comparison. Its output is the inverted, lightly smoothed crop. Without a --video, a synthetic one (a
bright moving "face" on a textured background) is written first.

    python examples/video_pipeline.py [--video in.avi] [--frames 240] [--size 360x640]
                                      [--batch-sizes 1,4,8] [--model swap.onnx] [--out DIR]
                                      [--device-call-ms 2] [--device-ms 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _needs import need

need("cv2")
import cv2  # noqa: E402
import numpy as np

import gpufleet

CROP = 128


# ---- the video ------------------------------------------------------------------------------------
def make_video(path: str, frames: int, size: tuple[int, int], fps: float = 25.0) -> str:
    h, w = size
    rng = np.random.default_rng(0)
    background = cv2.GaussianBlur(rng.integers(0, 120, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not out.isOpened():
        raise RuntimeError(f"cannot write {path} with OpenCV's MJPG encoder")
    r = max(4, min(h, w) // 6)
    for i in range(frames):
        img = background.copy()
        cx = int(w / 2 + (w / 3) * np.sin(i / 15))
        cy = int(h / 2 + (h / 4) * np.cos(i / 21))
        cv2.ellipse(img, (cx, cy), (r, int(r * 1.3)), 0, 0, 360, (230, 225, 220), -1)
        cv2.putText(img, f"{i:05d}", (8, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        out.write(img)
    out.release()
    return path


def frames_of(path: str):
    """The source: (index, frame) for every frame of the video."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {path!r}")
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield i, frame
            i += 1
    finally:
        cap.release()


# ---- the steps (shared by the pipeline and the serial loop) ----------------------------------------
def detect(item):
    """The face box: the bounding box of the bright pixels (the whole frame when there are none)."""
    i, frame = item
    mask = cv2.inRange(frame, (200, 200, 200), (255, 255, 255))
    pts = cv2.findNonZero(mask)
    h, w = frame.shape[:2]
    box = cv2.boundingRect(pts) if pts is not None else (0, 0, w, h)
    return i, frame, box


def crop(item):
    i, frame, (x, y, bw, bh) = item
    return i, frame, (x, y, bw, bh), cv2.resize(frame[y:y + bh, x:x + bw], (CROP, CROP), interpolation=cv2.INTER_AREA)


def collate(items):
    return [it[:3] for it in items], np.stack([it[3] for it in items])


def paste(item):
    (i, frame, (x, y, bw, bh)), face = item
    out = frame.copy()
    out[y:y + bh, x:x + bw] = cv2.resize(face, (bw, bh), interpolation=cv2.INTER_LINEAR)
    return i, out


# The simulated device's time profile (milliseconds): per call, per frame (set by --device-call-ms, --device-ms).
SIMULATED = {"call_ms": 2.0, "frame_ms": 1.0}


def swap_model(device, model_path=None):
    """The batched model for one replica on ``device``: uint8 (N, 128, 128, 3) -> uint8 of the same shape."""
    if model_path:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provs = gpufleet.onnx.providers(device, cache_dir=os.path.join(tempfile.gettempdir(), "gpufleet-trt"))
        sess = ort.InferenceSession(model_path, opts, providers=list(provs))
        name = sess.get_inputs()[0].name

        def run_onnx(x):
            y = sess.run(None, {name: x.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
            return (np.clip(y, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        run_onnx.backend = f"ONNX Runtime ({', '.join(p if isinstance(p, str) else p[0] for p in provs)})"
        return run_onnx
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        dev = torch.device(str(device)) if device.type == "cuda" else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 3, 3, padding=1), torch.nn.Sigmoid())
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        net = net.to(dev).eval()

        def run_torch(x):
            with torch.inference_mode():
                t = torch.from_numpy(x).to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 255
                return (net(t) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        run_torch.backend = f"PyTorch on {dev}"
        return run_torch

    call_s, frame_s = SIMULATED["call_ms"] / 1e3, SIMULATED["frame_ms"] / 1e3

    def run_simulated(x):  # SIMULATED DEVICE: the time of a device call, spent outside the GIL
        time.sleep(call_s + frame_s * len(x))
        return np.stack([cv2.GaussianBlur(255 - f, (5, 5), 1.2) for f in x])  # the "swap": inverted, smoothed
    run_simulated.backend = (f"SIMULATED DEVICE (no --model, no PyTorch): {SIMULATED['call_ms']:g} ms per call + "
                             f"{SIMULATED['frame_ms']:g} ms per frame, slept outside the GIL like a GPU call")
    return run_simulated


class VideoSink:
    """The encoder: one thread writes frames in order (the pipeline is ordered); checks the order."""

    def __init__(self, path: str, fps: float, size: tuple[int, int]):
        self.path, self.fps, self.size = path, fps, size
        self.writer, self.next = None, 0

    def open(self):
        h, w = self.size
        self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"MJPG"), self.fps, (w, h))

    def write(self, item):
        i, frame = item
        if i != self.next:
            raise RuntimeError(f"frame {i} arrived when frame {self.next} was due")
        self.writer.write(frame)
        self.next += 1

    def close(self):
        if self.writer is not None:
            self.writer.release()


# ---- the runs ---------------------------------------------------------------------------------------
def serial(video: str, out: str, fps: float, size, model_path) -> float:
    """The seed's default row: every step, one frame at a time, in one loop."""
    model = swap_model(gpufleet.Device("cuda:0") if gpufleet.device_count() else gpufleet.Device("cpu"), model_path)
    sink = VideoSink(out, fps, size)
    sink.open()
    t = time.perf_counter()
    for item in frames_of(video):
        meta, faces = collate([crop(detect(item))])
        sink.write(paste((meta[0], model(faces)[0])))
    sink.close()
    return time.perf_counter() - t


def pipelined(video: str, out: str, fps: float, size, batch: int, model_path):
    sink = VideoSink(out, fps, size)
    p = (gpufleet.Pipeline(frames_of(video), ordered=True, name=f"video batch {batch}")
         .map(detect, workers=2, name="detect")
         .map(crop, workers=2, name="crop")
         .batch(batch, max_delay=0.02, collate=collate, name="batch")
         .gpu(lambda device: _replica(device, model_path), factory=True, name="swap")
         .unbatch(name="unbatch")
         .map(paste, workers=2, name="paste")
         .sink(sink, name="encode"))
    return p.run()


def _replica(device, model_path):
    model = swap_model(device, model_path)
    return lambda b: list(zip(b[0], model(b[1])))


def count_frames(path: str) -> int:
    return sum(1 for _ in frames_of(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", help="input video (default: a synthetic one)")
    ap.add_argument("--frames", type=int, default=240, help="frames of the synthetic video")
    ap.add_argument("--size", default="360x640", help="HxW of the synthetic video")
    ap.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes to compare")
    ap.add_argument("--model", help="an ONNX swap model (NCHW float32 in and out)")
    ap.add_argument("--out", help="folder for the output videos (default: a temporary folder)")
    ap.add_argument("--device-call-ms", type=float, default=SIMULATED["call_ms"],
                    help="simulated device (no --model, no PyTorch): milliseconds per call (launch, transfers)")
    ap.add_argument("--device-ms", type=float, default=SIMULATED["frame_ms"],
                    help="simulated device: milliseconds per frame of a batch")
    args = ap.parse_args(argv)
    if args.model:
        try:
            import onnxruntime  # noqa: F401 - checked before any work
        except ImportError:
            ap.error("--model needs ONNX Runtime: pip install 'gpufleet[onnx]' (or onnxruntime-gpu)")
    if args.device_call_ms < 0 or args.device_ms < 0:
        ap.error("--device-call-ms and --device-ms must be >= 0")
    SIMULATED.update(call_ms=args.device_call_ms, frame_ms=args.device_ms)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--size must look like 360x640 and --batch-sizes like 1,4,8; got {args.size!r}, "
                 f"{args.batch_sizes!r}")
    if args.frames < 1 or h < 8 or w < 8 or min(sizes) < 1:
        ap.error("--frames, every batch size and the size (at least 8x8) must be positive")
    out = args.out or tempfile.mkdtemp(prefix="gf-video-")
    os.makedirs(out, exist_ok=True)
    video = args.video or make_video(os.path.join(out, "input.avi"), args.frames, (h, w))
    cap = cv2.VideoCapture(video)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    size = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    cap.release()
    n = count_frames(video)
    dev = gpufleet.Device("cuda:0") if gpufleet.device_count() else gpufleet.Device("cpu")
    print(f"video: {video}: {n} frames of {size[0]}x{size[1]}; model: {swap_model(dev, args.model).backend}")

    rows, ok = [], True
    wall = serial(video, os.path.join(out, "serial.avi"), fps, size, args.model)
    rows.append(("serial loop, batch 1 (the seed's default)", "n/a", wall, "-"))
    for b in sizes:
        path = os.path.join(out, f"batch{b}.avi")
        report = pipelined(video, path, fps, size, b, args.model)
        util = [g["utilization"] for g in report.gpu_samples if g["utilization"] is not None]
        rows.append((f"pipeline, batch {b}", f"{sum(util) / len(util):.0f}%" if util else "n/a (no GPU)",
                     report.wall_s, report.limiting_stage or "-"))
        written = count_frames(path)
        if report.errors or written != n:
            ok = False
            print(f"batch {b}: {len(report.errors)} errors, {written}/{n} frames written")
        if b == sizes[-1]:
            print(report.summary())
    print(f"\n{'configuration':<44}{'GPU util':>14}{'ms/frame':>10}{'FPS':>8}{'vs serial':>11}  limiting stage")
    for name, util, wall_s, limiting in rows:
        print(f"{name:<44}{util:>14}{1e3 * wall_s / n:>10.2f}{n / wall_s:>8.1f}{rows[0][2] / wall_s:>10.2f}x  "
              f"{limiting}")
    print(f"outputs: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
