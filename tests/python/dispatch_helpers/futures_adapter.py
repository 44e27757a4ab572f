"""GPUExecutor in ProcessPoolExecutor's constructor, for CPython's concurrent.futures tests
(tests/python/test_cpython_futures.py). Importing it swaps ``concurrent.futures.ProcessPoolExecutor``
for ``ProcessPoolExecutor`` below, also in the interpreters those tests start (their scripts import
it from ``concurrent.futures``)."""
from __future__ import annotations

import concurrent.futures

import gpufleet

REAL_PROCESS_POOL = concurrent.futures.ProcessPoolExecutor


class ProcessPoolExecutor(gpufleet.GPUExecutor):
    """``ProcessPoolExecutor(max_workers, mp_context, initializer, initargs, *, max_tasks_per_child)``
    as a ``GPUExecutor`` on CPU workers. ``mp_context`` is ignored: workers are always fresh
    interpreters (like the spawn start method). Named like the stdlib class on purpose: the tests'
    subprocess scripts import the executor by that name."""

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *, max_tasks_per_child=None):
        super().__init__("cpu", initializer=initializer, initargs=initargs, max_tasks_per_worker=max_tasks_per_child,
                         max_workers=max_workers)


def install() -> None:
    concurrent.futures.ProcessPoolExecutor = ProcessPoolExecutor


install()
