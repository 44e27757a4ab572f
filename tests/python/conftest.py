"""Shared pytest fixtures. Part-specific fixtures live in the part's own test modules."""
from __future__ import annotations

import os

import pytest

import gpufleet

_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_SIMULATED_GPUS", "GPUFLEET_DISABLE_NVML",
             "GPUFLEET_NVML_LIBRARY")


@pytest.fixture(autouse=True)
def _isolated_device_state(monkeypatch):
    """Every test starts with no simulation and the device variables as the session had them,
    and leaves nothing behind."""
    for key in _ENV_KEYS:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
    gpufleet.simulate_gpus(None)
    yield
    gpufleet.simulate_gpus(None)


@pytest.fixture
def sim_gpus():
    """Installs a simulated topology for the test: ``sim_gpus(4)`` or ``sim_gpus([{...}, ...])``."""

    def install(spec):
        gpufleet.simulate_gpus(spec)
        return gpufleet.devices()

    return install


def pytest_report_header(config):
    b = gpufleet.build_info()
    return (f"gpufleet {b['version']} from {os.path.dirname(gpufleet.__file__)}: CUDA compiled in: {b['cuda']}, "
            f"visible GPUs: {gpufleet.device_count()}")


requires_cuda_device = pytest.mark.skipif(
    gpufleet.build_info()["cuda"] is False or gpufleet.topology().source in ("none", "simulated"),
    reason="needs a real CUDA device and a CUDA build",
)
