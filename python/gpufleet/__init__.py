"""gpufleet: spread GPU work across devices.

The compiled core is the private module ``gpufleet._core``; this package re-exports the public
names of each part (one private module per part, each with its own ``__all__``):

- ``_devices``: discovery, selection, simulation, seeding (csrc/device)
- ``_tensor``: Tensor, transfers, streams, DLPack, Module, scatter/gather (csrc/tensor)
- ``_dispatch``: Task, run, RunReport (csrc/dispatch)
- ``_executor``: GPUExecutor, spawn (csrc/dispatch)
- ``_pipeline``: Pipeline (csrc/pipeline)

Public submodules: ``gpufleet.kernels`` (``gpufleet.kernels.gaussian_blur`` ...), ``gpufleet.sinks``
(``SqlSink``) and ``gpufleet.onnx`` (``providers``).
"""
from . import _core
from ._core import __version__
from . import _devices, _tensor, _dispatch, _executor, _pipeline
from ._devices import *  # noqa: F401,F403
from ._tensor import *  # noqa: F401,F403
from ._dispatch import *  # noqa: F401,F403
from ._executor import *  # noqa: F401,F403
from ._pipeline import *  # noqa: F401,F403
from ._extras import MissingExtraError  # noqa: F401
from . import kernels, onnx, sinks  # noqa: E402

__all__ = [
    "__version__",
    "kernels",
    "onnx",
    "sinks",
    "MissingExtraError",
    *_devices.__all__,
    *_tensor.__all__,
    *_dispatch.__all__,
    *_executor.__all__,
    *_pipeline.__all__,
]
