"""Shared by the GPU test files of issue 17 (test_cuda_contract.py, test_cuda_lifetimes.py): the skip
marker, the seeded generator and the CuPy/PyTorch fixtures. Import the fixtures into the test module."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import gpufleet

requires_cuda = pytest.mark.skipif(
    not gpufleet.build_info()["cuda"] or gpufleet.topology().source in ("none", "simulated"),
    reason="needs a CUDA device and a CUDA build")

# Fresh inputs every run; set GPUFLEET_TEST_SEED to replay a failure (the seed is in the messages).
SEED = int(os.environ.get("GPUFLEET_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")
