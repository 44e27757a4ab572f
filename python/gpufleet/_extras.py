"""Optional parts and the extras that bring them (Note [Optional extras]).

Note [Optional extras]
~~~~~~~~~~~~~~~~~~~~~~
The core (``pip install gpufleet``) needs NumPy, tqdm (progress is on by default in a terminal)
and cloudpickle (callables defined in ``__main__`` or a notebook cell travel by value). Everything
else is an extra named in pyproject.toml and in the README:

- ``plot``: matplotlib, for ``RunReport.plot_timeline``, ``PipelineReport.plot`` and
  ``gpufleet run --timeline``;
- ``sql``: SQLAlchemy and PyMySQL, for ``SqlSink`` with a server URL (SQLite needs nothing);
- ``onnx``: ONNX Runtime, to validate ``gpufleet.onnx.providers`` against the installed build;
- ``notebook``: ipywidgets, for progress widgets in Jupyter (without it: plain lines);
- ``examples``: what ``examples/`` imports (OpenCV, scikit-learn, matplotlib);
- ``ray``: Ray, for the ``cluster=`` argument of ``run``, ``GPUExecutor``, ``spawn`` and
  ``Pipeline.gpu``, ``gpufleet run --cluster`` and ``gpufleet info --cluster`` (gpufleet/cluster/);
  without a ``cluster=`` Ray is never imported;
- ``all``: every one of them.

A feature asked for without its extra fails **before any work starts**: the check sits where the
feature is requested (a constructor, argument parsing), never where it is first used, so a run of
a thousand tasks does not end in an ImportError after the last one. The error,
``MissingExtraError`` (an ``ImportError``), names the feature, the missing module and the
``pip install`` line; it chains the real ImportError.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError"]

#: extra -> the top-level modules it provides (pyproject.toml's optional-dependencies, by import name)
EXTRAS: dict[str, tuple[str, ...]] = {
    "plot": ("matplotlib",),
    "sql": ("sqlalchemy", "pymysql"),
    "onnx": ("onnxruntime",),
    "notebook": ("ipywidgets",),
    "examples": ("cv2", "sklearn", "matplotlib"),
    "ray": ("ray",),
}


class MissingExtraError(ImportError):
    """A feature needs a package that is not installed; the message names the extra to install."""

    def __init__(self, feature: str, module: str, extra: str, reason: str = ""):
        self.feature, self.extra = feature, extra
        why = f" ({reason})" if reason else ""
        super().__init__(f"{feature} needs the Python package {module!r}, which cannot be imported{why}: "
                         f"install it with: pip install 'gpufleet[{extra}]'", name=module)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises ``MissingExtraError`` naming ``feature`` and ``extra``."""
    if extra not in EXTRAS or (module not in EXTRAS[extra] and module.split(".")[0] not in EXTRAS[extra]):
        raise ValueError(f"internal: {module!r} is not part of the extra {extra!r}: {EXTRAS}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(feature, module, extra, str(e)) from e
