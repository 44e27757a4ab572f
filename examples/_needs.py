"""What the examples import beyond gpufleet's core comes with ``pip install 'gpufleet[examples]'``
(OpenCV, scikit-learn, matplotlib). Each example calls ``need(...)`` before its imports, so that a
machine without the extra gets one line naming it, before any work, instead of a traceback."""
import importlib
import os
import sys

NAMES = {"cv2": "OpenCV (opencv-python-headless)", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def need(*modules: str) -> None:
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(NAMES.get(m, m))
    if missing:
        sys.exit(f"{os.path.basename(sys.argv[0])}: needs {', '.join(missing)}, which cannot be imported: "
                 f"pip install 'gpufleet[examples]'")
