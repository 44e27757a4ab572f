"""Running Python as on a machine without some packages (tests/python/blocker/sitecustomize.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence

import gpufleet

BLOCKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blocker")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gpufleet.__file__)))


def env_without(modules: Sequence[str], **extra: str) -> dict:
    """The environment of a Python process in which ``modules`` are not installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([BLOCKER, PACKAGE_ROOT]),
            "GPUFLEET_TEST_BLOCK": ",".join(modules), **extra}


def run_without(modules: Sequence[str], argv: Sequence[str], *, cwd: Optional[str] = None, timeout: float = 120,
                **extra_env: str) -> subprocess.CompletedProcess:
    """``python argv...`` without ``modules``; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env_without(modules, **extra_env), stdin=subprocess.DEVNULL)
