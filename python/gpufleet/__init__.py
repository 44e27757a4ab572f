"""gpufleet: spread GPU work across devices.

The compiled core is the private module ``gpufleet._core``; this package re-exports the public
names of each part (one private module per part, each with its own ``__all__``):

- ``_devices``: discovery, selection, simulation, seeding (csrc/device)
- ``_tensor``: Tensor, transfers, streams, DLPack, Module, scatter/gather (csrc/tensor)
- ``_dispatch``: Task, run, RunReport (csrc/dispatch)
- ``_executor``: GPUExecutor, spawn (csrc/dispatch)
- ``_pipeline``: Pipeline (csrc/pipeline)
- ``queue``: submit, Job (the queue that outlives the shell, python/gpufleet/queue)

Public submodules: ``gpufleet.kernels`` (``gpufleet.kernels.gaussian_blur`` ...), ``gpufleet.sinks``
(``SqlSink``), ``gpufleet.onnx`` (``providers``) and ``gpufleet.queue``.
"""
# Note [Lazy package]: `import gpufleet` loads nothing but this file; the compiled core and the parts (NumPy among them,
# ~130 ms in all) load on the first use of any public name. `gpufleet submit` and the other queue
# commands are small clients started once per job from shells and scripts, and their start-up time
# is the queue's submit latency (benchmarks/queue_bench.py); everything else sees the same names
# as before: gpufleet.X, `from gpufleet import *`, dir(gpufleet), gpufleet._part.
from __future__ import annotations

import importlib

TYPE_CHECKING = False  # the typing module alone would cost 6 ms

if TYPE_CHECKING:  # what type checkers and readers see; at run time _load() binds the same names
    from . import _core, kernels, onnx, queue, sinks  # noqa: F401
    from ._core import __version__  # noqa: F401
    from ._devices import *  # noqa: F401,F403
    from ._dispatch import *  # noqa: F401,F403
    from ._executor import *  # noqa: F401,F403
    from ._extras import MissingExtraError  # noqa: F401
    from ._pipeline import *  # noqa: F401,F403
    from ._tensor import *  # noqa: F401,F403
    from .queue import Job, submit  # noqa: F401

_loaded = False
_loading = False


def _load() -> None:
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        from . import _devices, _dispatch, _executor, _extras, _pipeline, _tensor, kernels, onnx, queue, sinks

        g = globals()
        names = ["__version__", "kernels", "onnx", "sinks", "queue", "MissingExtraError"]
        from ._core import __version__

        g.update(kernels=kernels, onnx=onnx, sinks=sinks, queue=queue, MissingExtraError=_extras.MissingExtraError,
                 __version__=__version__)
        for part in (_devices, _tensor, _dispatch, _executor, _pipeline, queue):
            for name in part.__all__:
                g[name] = getattr(part, name)
            names += part.__all__
        g["__all__"] = names
        _loaded = True
    finally:
        _loading = False


def __getattr__(name: str):
    if name == "__version__":
        from ._core import __version__

        return __version__
    if name.startswith("_") and name != "__all__":
        if name.startswith("__"):
            raise AttributeError(f"module 'gpufleet' has no attribute {name!r}")
        try:  # a private part (gpufleet._dispatch): load that module alone
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'gpufleet' has no attribute {name!r}") from None
    _load()
    try:
        return globals()[name]
    except KeyError:
        raise AttributeError(f"module 'gpufleet' has no attribute {name!r}") from None


def __dir__() -> list:
    _load()
    return sorted(globals())
