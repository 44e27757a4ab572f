"""gpufleet.kernels: the seed-003 postprocessing chain as kernels with a multi-threaded CPU backend and a
CUDA backend, each step usable on its own.

Every function takes a NumPy array (or anything with the buffer protocol / ``__array__`` /
``__dlpack__`` on the CPU) or a CUDA array through DLPack (PyTorch, CuPy, ...), an image ``(H, W)`` or a
batch ``(N, H, W)``, and returns its result on the input's device, as the input's own array type where
that type's library has ``from_dlpack`` (NumPy arrays for NumPy and other CPU inputs). CUDA work runs on
the input library's current stream (the legacy default stream otherwise), with no host synchronisation
(one exception: :func:`normalize_minmax` of a float array waits for its min/max pass, to raise on NaN as
the CPU path does).

A CUDA result behaves like an array its library allocated on that stream: its memory is reused only
after the work queued on that stream when it is released (the stream object is kept alive meanwhile),
and inputs stay alive until the kernels reading them have run. Work on another stream that uses a
result must finish before the result is released, PyTorch's rule (see ``csrc/kernels/device_memory.h``,
Note [Kernel result lifetimes]).

- :func:`gaussian_blur`: ``cv2.GaussianBlur`` (float32, uint8; replicate / reflect101 / constant).
- :func:`canny`: bit-identical to ``cv2.Canny`` with aperture 3.
- :func:`kmeans1d`: exact 1-D k-means (global optimum, labels by increasing centre) or k-means++/Lloyd.
- :func:`normalize_minmax`, :func:`mean`: the seed's min-max to uint8; a mean accumulated in double.
- :func:`congestion_score`: the whole chain, one score per image.

CPU kernels use :func:`get_num_threads` threads (all the CPUs this process may use, or the
``GPUFLEET_NUM_THREADS`` environment variable); change it with :func:`set_num_threads`.
"""
from __future__ import annotations

import atexit
import math
import sys
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__all__ = [
    "KMeansResult",
    "canny",
    "congestion_score",
    "gaussian_blur",
    "get_num_threads",
    "kmeans1d",
    "mean",
    "memory_stats",
    "normalize_minmax",
    "set_num_threads",
]

KernelBuffer = _core.KernelBuffer


def get_num_threads() -> int:
    """The number of threads the CPU kernels use."""
    return _core._kernels_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads the CPU kernels use (``n >= 1``, or 0 for the default)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"set_num_threads: expected an int, got {n!r}")
    _core._kernels_set_num_threads(int(n))


# ---- array plumbing ---------------------------------------------------------------------------

def _is_cuda(x: Any) -> bool:
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return False
    return _core._kernels_is_cuda(x)


def _cuda_stream(x: Any) -> Tuple[int, Any]:
    """(DLPack stream value, stream object) of the input library's current stream (1: legacy default).
    The stream object is kept by the results, so the library cannot destroy the stream (CuPy does when
    its Stream is collected) before the results made on it are released."""
    mod = sys.modules.get(type(x).__module__.split(".")[0])
    s, owner = 0, None
    try:
        if mod is not None and mod.__name__ == "torch":
            owner = mod.cuda.current_stream(x.device)
            s = int(owner.cuda_stream)
        elif mod is not None and mod.__name__ == "cupy":
            with x.device:
                owner = mod.cuda.get_current_stream()
                s = int(owner.ptr)
    except Exception:  # noqa: BLE001 - an unknown library: use the legacy default stream
        s, owner = 0, None
    return (s if s != 0 else 1), owner


def _prepare(x: Any, what: str) -> Tuple[Any, int, Any]:
    """(object for the core, stream, stream owner): a C-contiguous NumPy array for CPU inputs, the
    object itself for CUDA inputs (the core reads it through DLPack)."""
    if x is None:
        raise TypeError(f"{what}: expected an array, got None")
    if _is_cuda(x):
        return (x, *_cuda_stream(x))
    if isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        arr = np.from_dlpack(x)
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"{what}: expected an array (NumPy, buffer protocol, __array__ or __dlpack__), got "
                            f"{type(x).__name__}") from e
    if arr.dtype == object or arr.dtype.kind not in "uif":
        raise ValueError(f"{what}: unsupported dtype {arr.dtype}: expected a numeric array")
    return np.ascontiguousarray(arr), 0, None


def _wrap(x: Any, out: Any) -> Any:
    """Returns `out` (a NumPy array or a KernelBuffer) as `x`'s own array type when possible."""
    if isinstance(x, np.ndarray):
        return out
    if isinstance(out, np.ndarray) and not hasattr(x, "__dlpack__"):
        return out
    mod = sys.modules.get(type(x).__module__.split(".")[0])
    from_dlpack = getattr(mod, "from_dlpack", None) if mod is not None and mod is not np else None
    if from_dlpack is not None:
        try:
            return from_dlpack(out)
        except Exception:  # noqa: BLE001 - fall back to what we have
            pass
    return out


def _check_image_rank(arr: Any, what: str) -> None:
    ndim = len(arr.shape)
    if ndim not in (2, 3):
        raise ValueError(f"{what}: expected an image (H, W) or a batch of images (N, H, W), got shape "
                         f"{tuple(arr.shape)}")


def _int_arg(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what}: expected an int, got {v!r}")
    return int(v)


def _float_arg(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what}: expected a number, got {v!r}")
    return float(v)


# ---- kernels ----------------------------------------------------------------------------------

def gaussian_blur(x: Any, ksize: Union[int, Sequence[int]], sigma: float, sigma_y: Optional[float] = None,
                  border: str = "replicate") -> Any:
    """``cv2.GaussianBlur(x, ksize, sigma, sigmaY=sigma_y, borderType=border)`` on float32 or uint8.

    ``ksize`` is an odd int, a ``(width, height)`` pair as OpenCV's, or 0 to derive it from sigma
    (``round(sigma*4*2+1)|1`` for float32, ``*3`` for uint8). ``sigma`` must be > 0 (OpenCV's
    derivation of sigma from ksize is not offered); ``sigma_y`` defaults to ``sigma``. Borders:
    ``"replicate"``, ``"reflect101"`` (OpenCV's default) or ``"constant"`` (zeros). A dimension of size 1
    uses a 1-tap kernel unless the border is constant, as OpenCV. uint8 results round to nearest.
    """
    obj, stream, owner = _prepare(x, "gaussian_blur")
    _check_image_rank(obj, "gaussian_blur(x)")
    if isinstance(ksize, (tuple, list)):
        if len(ksize) != 2:
            raise ValueError(f"gaussian_blur: ksize={ksize!r}: expected an int or a (width, height) pair")
        kx, ky = (_int_arg(k, "gaussian_blur(ksize)") for k in ksize)
    else:
        kx = ky = _int_arg(ksize, "gaussian_blur(ksize)")
    s = _float_arg(sigma, "gaussian_blur(sigma)")
    sy = 0.0 if sigma_y is None else _float_arg(sigma_y, "gaussian_blur(sigma_y)")
    if sigma_y is not None and not sy > 0:
        raise ValueError(f"gaussian_blur: sigma_y={sigma_y!r} is invalid: expected a finite number > 0 or None")
    if not isinstance(border, str):
        raise TypeError(f"gaussian_blur: border must be a string, got {border!r}")
    return _wrap(x, _core._kernels_gaussian_blur(obj, stream, kx, ky, s, sy, border, stream_owner=owner))


def canny(img_u8: Any, low: float, high: float, l2gradient: bool = False) -> Any:
    """``cv2.Canny(img_u8, low, high, apertureSize=3, L2gradient=l2gradient)``, bit for bit: uint8 edges
    (0 or 255). Thresholds are floored and swapped if reversed, as OpenCV."""
    obj, stream, owner = _prepare(img_u8, "canny")
    _check_image_rank(obj, "canny(img_u8)")
    return _wrap(img_u8, _core._kernels_canny(obj, stream, _float_arg(low, "canny(low)"),
                                              _float_arg(high, "canny(high)"), bool(l2gradient), stream_owner=owner))


class KMeansResult(NamedTuple):
    """labels: int32 with the values' shape, numbered by increasing centre; centres: float64 ``(k,)``
    (``(N, k)`` for a batch), NaN past the number of clusters found; inertia: the sum of squared
    distances of every value to its centre (float, or ``(N,)`` for a batch)."""

    labels: Any
    centres: Any
    inertia: Any


def kmeans1d(values: Any, k: int, *, method: str = "exact", sample: Optional[float] = None,
             seed: Optional[int] = None, n_init: int = 10) -> KMeansResult:
    """k-means on scalar values: a 1-D array or one image ``(H, W)`` is one problem; a batch
    ``(N, H, W)`` is one problem per image.

    ``method="exact"``: the global optimum by dynamic programming (on the 256-bin histogram for uint8,
    over sorted values otherwise); deterministic. ``method="lloyd"``: k-means++ (greedy, as
    scikit-learn) and Lloyd iterations with ``n_init`` restarts, keeping the lowest inertia; a local
    optimum. ``sample``: fit on this fraction of the values (a uniform random sample without
    replacement, as the seed's 5 %), then label every value. ``seed``: for sampling and k-means++.

    Labels are numbered by increasing centre and each value takes its nearest centre (ties to the lower
    label); the inertia is over all values. With fewer distinct values d than k there are d clusters
    (one per distinct value, inertia 0) and the centres past d are NaN; constant input gives label 0
    everywhere. Values must be uint8, float32 or float64 and finite.
    """
    obj, stream, owner = _prepare(values, "kmeans1d")
    k = _int_arg(k, "kmeans1d(k)")
    if sample is None:
        frac = 0.0
    else:
        frac = _float_arg(sample, "kmeans1d(sample)")
        if not (0 < frac <= 1):
            raise ValueError(f"kmeans1d: sample={sample!r} is invalid: expected a fraction in (0, 1] or None")
    if seed is not None:
        seed = _int_arg(seed, "kmeans1d(seed)")
        if seed < 0 or seed >= 2**64:
            raise ValueError(f"kmeans1d: seed={seed} is invalid: expected an integer in [0, 2**64)")
    n_init = _int_arg(n_init, "kmeans1d(n_init)")
    ndim = len(obj.shape)
    if ndim not in (1, 2, 3):
        raise ValueError(f"kmeans1d: expected values of shape (n,), (H, W) or (N, H, W), got {tuple(obj.shape)}")
    per_image = ndim == 3
    labels, centres, inertia, _clusters = _core._kernels_kmeans1d(obj, stream, k, method, frac, seed, n_init, 300,
                                                                  1e-4, per_image, stream_owner=owner)
    if _is_cuda(obj):
        centres, inertia = _wrap(values, centres), _wrap(values, inertia)
        if not per_image and hasattr(centres, "__getitem__"):  # (k,) and a 0-d inertia, on the device
            centres, inertia = centres[0], inertia[0]
        return KMeansResult(_wrap(values, labels), centres, inertia)
    if not per_image:
        centres = centres[0]
        inertia = float(inertia[0])
    return KMeansResult(_wrap(values, labels), _wrap(values, centres),
                        inertia if isinstance(inertia, float) else _wrap(values, inertia))


def normalize_minmax(x: Any, dtype: Any = np.uint8) -> Any:
    """The seed's ``((x - x.min()) * 255 / (x.max() - x.min())).astype(dtype)`` evaluated in float32 as
    NumPy does, per image for a batch ``(N, H, W)`` and over the whole array otherwise. A constant image
    maps to 0 (the seed divides by zero there). ``dtype``: uint8 (truncating, as ``astype``) or float32.
    Input uint8, int32, int64, float32 or float64 (cast to float32 first, as the seed: float64 values
    beyond float32's range become ±inf; an image of +inf or of -inf is constant). NaN raises ValueError
    naming its index; on CUDA a float input therefore waits for its min/max pass (one host
    synchronisation, the only one in gpufleet.kernels; integer inputs never wait)."""
    obj, stream, owner = _prepare(x, "normalize_minmax")
    name = np.dtype(dtype).name
    if name not in ("uint8", "float32"):
        raise ValueError(f"normalize_minmax: dtype={name} is not supported: expected uint8 or float32")
    shape = tuple(obj.shape)
    if len(shape) == 0 or math.prod(shape) == 0:
        raise ValueError(f"normalize_minmax: expected a non-empty array, got shape {shape}")
    groups = shape[0] if len(shape) == 3 else 1
    return _wrap(x, _core._kernels_normalize_minmax(obj, stream, name, groups, stream_owner=owner))


def mean(x: Any, axis: Union[None, int, Sequence[int]] = None) -> Any:
    """``np.mean(x, axis)`` accumulated in double (float64 result): a float for ``axis=None``, an array
    over the remaining axes otherwise (e.g. ``axis=(1, 2)``: one mean per image). On CUDA the reduced
    axes must be the trailing ones."""
    obj, stream, owner = _prepare(x, "mean")
    shape = tuple(obj.shape)
    nd = len(shape)
    if math.prod(shape) == 0:
        raise ValueError(f"mean: expected a non-empty array, got shape {shape}")
    if axis is None:
        axes = tuple(range(nd))
    else:
        raw = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else tuple(axis)
        axes = []
        for a in raw:
            a = _int_arg(a, "mean(axis)")
            if not -nd <= a < nd:
                raise ValueError(f"mean: axis {a} is out of range for an array of {nd} dimensions")
            axes.append(a % nd)
        if len(set(axes)) != len(axes):
            raise ValueError(f"mean: repeated axis in {axis!r}")
        axes = tuple(sorted(axes))
    keep = tuple(i for i in range(nd) if i not in axes)
    if axes != tuple(range(nd - len(axes), nd)):
        if _is_cuda(obj):
            raise ValueError(f"mean: on CUDA the reduced axes must be the trailing ones, got axis={axis!r} for "
                             f"{nd} dimensions")
        obj = np.ascontiguousarray(np.transpose(obj, keep + axes))
    out_shape = tuple(shape[i] for i in keep)
    groups = math.prod(out_shape) if out_shape else 1
    res = _core._kernels_mean(obj, stream, groups, stream_owner=owner)
    if _is_cuda(obj):
        return _wrap(x, res)  # (groups,) on the device
    if axis is None or not out_shape:
        return float(res[0])
    return _wrap(x, res.reshape(out_shape))


def congestion_score(depth: Any, *, k: int = 4, canny_thresholds: Tuple[float, float] = (100, 200), ksize: int = 71,
                     sigma: float = 7, mode: str = "fast", return_intermediates: bool = False) -> Any:
    """The seed-003 postprocess: exact k-means of the depth values (k clusters, every pixel) -> label
    map -> :func:`normalize_minmax` to uint8 -> :func:`canny` -> :func:`gaussian_blur` (ksize, sigma,
    replicated borders) -> mean. Returns a float for an image ``(H, W)``, a float64 array ``(N,)`` for a
    batch (on the input's device).

    ``mode="faithful"`` blurs the edge map as the seed does and averages it in double; ``mode="fast"``
    uses the blur's linearity (each edge pixel contributes its row and column weights) and never builds
    the blurred map. They agree to about 1e-7 relative.

    Labels are numbered by increasing centre (the exact k-means is deterministic). The seed numbers its
    labels in scikit-learn's k-means++ selection order and fits on an unseeded 5 % sample, so its label
    image, hence its normalised image, edges and score, change from run to run; gpufleet's do not.
    Fed the same label map, this chain matches the seed's OpenCV steps (see tests).

    With ``return_intermediates=True`` returns ``(score, dict)`` with ``labels``, ``centres``,
    ``normalized``, ``edges`` and, in faithful mode, ``blurred``.
    """
    obj, stream, owner = _prepare(depth, "congestion_score")
    _check_image_rank(obj, "congestion_score(depth)")
    if mode not in ("fast", "faithful"):
        raise ValueError(f"congestion_score: mode={mode!r} is invalid: expected 'fast' or 'faithful'")
    try:
        low, high = canny_thresholds
    except (TypeError, ValueError):
        raise ValueError(f"congestion_score: canny_thresholds={canny_thresholds!r}: expected a (low, high) pair") from None
    scores, inter = _core._kernels_congestion_score(
        obj, stream, _int_arg(k, "congestion_score(k)"), _float_arg(low, "canny low"), _float_arg(high, "canny high"),
        _int_arg(ksize, "congestion_score(ksize)"), _float_arg(sigma, "congestion_score(sigma)"), mode == "fast",
        bool(return_intermediates), stream_owner=owner)
    single = len(obj.shape) == 2
    cuda = _is_cuda(obj)

    def one(v):  # drop the batch axis of a single image's results (a 0-d array for a CUDA score)
        v = _wrap(depth, v)
        return v[0] if single and hasattr(v, "__getitem__") else v

    if cuda:
        result = one(scores)
    else:
        result = float(scores[0]) if single else scores
    if not return_intermediates:
        return result
    return result, {name: one(v) for name, v in inter.items()}


def memory_stats(device: Any = None) -> dict:
    """Counters of the CUDA kernels' device memory on ``device`` (the current CUDA device by default):
    ``backend`` ("pool": gpufleet's own CUDA memory pool, "caching": the tensors' caching allocator where
    the device has no memory pools or ``GPUFLEET_KERNELS_MEMORY=caching``; "" before the first kernel
    ran there), ``used_bytes``, ``reserved_bytes``, ``release_threshold`` (bytes the pool keeps across
    synchronisations), ``live_results`` (results not yet released), ``failed_releases`` (CUDA errors
    while releasing a result; 0 unless the device failed) and ``held_inputs`` (inputs kept until the
    kernels reading them have run). ``gpufleet.empty_cache()`` trims the pool."""
    return _core._kernels_memory_stats(device)


# Inputs held for kernels still in flight are released after those kernels, also at exit.
atexit.register(_core._kernels_release_held)
