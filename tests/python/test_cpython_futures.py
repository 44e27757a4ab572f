"""CPython's own ``concurrent.futures`` tests, run against ``GPUExecutor``.

The tests come from Debian's ``libpython3.11-testsuite`` package (requirements/debian.txt), never from
a copy in this repository: /usr/lib/python3.11/test/test_concurrent_futures.py (Debian's 3.11.x). The
venv's interpreter is pyenv's 3.11.7, whose own ``test`` package lacks that file, so ``test`` is made
to resolve to Debian's: a directory holding a ``test`` symlink to /usr/lib/python3.11/test goes first
on ``sys.path`` before ``test`` is imported (the same minor version, so ``test.support`` and the
tests run unchanged on 3.11.7). Workers inherit the parent's ``sys.path``, and the interpreters the
tests start get it, with the executor swapped in, from a prelude added to their ``-c`` scripts.

The process-pool test classes of the spawn start method are collected here with
``ProcessPoolExecutor`` replaced by ``GPUExecutor`` (tests/python/dispatch_helpers/futures_adapter.py;
the fork and forkserver variants would run the same executor again). Every test that fails does so
for a reason written in ``EXPECTED_FAILURES`` and in the README's table of differences, and this
runner checks it still fails that way: a fix or a regression is noticed.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

DEBIAN_TESTS = Path("/usr/lib/python3.11/test")
HELPERS = Path(__file__).parent / "dispatch_helpers"

if not (DEBIAN_TESTS / "test_concurrent_futures.py").exists():
    pytest.skip("needs Debian's libpython3.11-testsuite (requirements/debian.txt)", allow_module_level=True)
if sys.version_info[:2] != (3, 11):
    pytest.skip(f"Debian's test suite is CPython 3.11's; this is {sys.version.split()[0]}", allow_module_level=True)
if os.environ.get("GPUFLEET_EXPECT_CUDA_BUILD") == "1":  # make test: once, in the CUDA-off run (3 minutes)
    pytest.skip("runs in the CUDA-off flavour of make test (the executor is the same Python code)",
                allow_module_level=True)

_link_dir = Path(tempfile.mkdtemp(prefix="gpufleet-cpython-tests-"))
atexit.register(shutil.rmtree, _link_dir, ignore_errors=True)
(_link_dir / "test").symlink_to(DEBIAN_TESTS)
for _name in [m for m in sys.modules if m == "test" or m.startswith("test.")]:
    del sys.modules[_name]  # another `test` package (pyenv's) imported before us
sys.path.insert(0, str(_link_dir))
sys.path.insert(1, str(HELPERS))

import futures_adapter  # noqa: E402 - swaps concurrent.futures.ProcessPoolExecutor
import gpufleet  # noqa: E402
import test.test_concurrent_futures as cf  # noqa: E402

assert Path(cf.__file__).resolve().parent == DEBIAN_TESTS.resolve(), cf.__file__

_STAGE = os.path.dirname(os.path.dirname(gpufleet.__file__))
_PRELUDE = (f"import sys; sys.path[:0] = [{str(_link_dir)!r}, {_STAGE!r}, {str(HELPERS)!r}]; "
            "import futures_adapter\n")
_assert_python_ok = cf.assert_python_ok


def _assert_python_ok(*args, **env):
    """The tests' subprocess scripts, run with the executor swapped in (and `test` found)."""
    if len(args) >= 2 and args[0] == "-c":
        args = ("-c", _PRELUDE + args[1]) + args[2:]
    return _assert_python_ok_orig(*args, **env)


_assert_python_ok_orig = cf.assert_python_ok
cf.assert_python_ok = _assert_python_ok
cf.ProcessPoolSpawnMixin.executor_type = futures_adapter.ProcessPoolExecutor

# test name -> (exception type raised, text in its message, why: the README's table of differences)
EAGER = ("workers start with the executor, all of them (initializers load models before the first call), not "
         "one per submit")
SUBMIT_PICKLES = ("submit() pickles the call in the caller's thread and raises SerializationError there; "
                  "ProcessPoolExecutor pickles later and fails the future")
ARG_UNPICKLING = ("an argument that fails to unpickle in the worker fails that call with the worker's real exception "
                  "and the worker goes on; ProcessPoolExecutor breaks the pool")
INTERNALS = ("the test inspects ProcessPoolExecutor's internals ({}); the same contract is tested in "
             "tests/python/test_executor.py ({})")
# "Class.test" -> (exception type raised, text in its message, why: the README's table of differences)
EXPECTED_FAILURES = {
    "ProcessPoolSpawnProcessPoolShutdownTest.test_processes_terminate": (
        "SerializationError", "Semaphore objects should only be shared between processes through inheritance",
        SUBMIT_PICKLES + "; and " + EAGER),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_one": ("AssertionError", "5 != 1", EAGER),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_multiple": (
        "AssertionError", "5 not less than or equal to 3", EAGER),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_killed_child": (
        "AssertionError", "BrokenProcessPool not raised",
        "a dead worker fails only the call it ran (WorkerDiedError, a BrokenProcessPool) and is replaced: the "
        "executor stays usable"),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_saturation": (
        "SerializationError", "cannot pickle '_multiprocessing.SemLock'", SUBMIT_PICKLES),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": (
        "AttributeError", "_mp_context", "no mp_context: workers are always fresh interpreters, as with spawn"),
    "ProcessPoolSpawnProcessPoolShutdownTest.test_del_shutdown": (
        "AttributeError", "_executor_manager_thread",
        INTERNALS.format("_executor_manager_thread, _call_queue", "test_dropped_executor_finishes_its_calls")),
    "ProcessPoolSpawnProcessPoolShutdownTest.test_shutdown_no_wait": (
        "AttributeError", "_call_queue",
        INTERNALS.format("_call_queue, _executor_manager_thread", "test_shutdown_without_wait_finishes_its_calls")),
    "ProcessPoolSpawnExecutorDeadlockTest.test_error_at_task_pickle": (
        "SerializationError", "Error in pickle", SUBMIT_PICKLES),
    "ProcessPoolSpawnExecutorDeadlockTest.test_shutdown_deadlock_pickle": (
        "AttributeError", "_executor_manager_thread",
        INTERNALS.format("_executor_manager_thread", "test_callables.py, test_an_unpicklable_argument_fails_at_"
                         "submit_naming_it") + "; and " + SUBMIT_PICKLES),
    "ProcessPoolSpawnExecutorDeadlockTest.test_error_at_task_unpickle": ("UnpicklingError", "", ARG_UNPICKLING),
    "ProcessPoolSpawnExecutorDeadlockTest.test_exit_at_task_unpickle": ("SystemExit", "1", ARG_UNPICKLING),
}

CLASSES = ["ProcessPoolSpawnInitializerTest", "ProcessPoolSpawnFailingInitializerTest",
           "ProcessPoolSpawnProcessPoolShutdownTest", "ProcessPoolSpawnWaitTest", "ProcessPoolSpawnAsCompletedTest",
           "ProcessPoolSpawnProcessPoolExecutorTest", "ProcessPoolSpawnExecutorDeadlockTest"]


def _expect_failure(method, name: str, kind: str, text: str, why: str):
    @functools.wraps(method)
    def run(self):
        try:
            method(self)
        except unittest.SkipTest:
            raise
        except BaseException as e:  # noqa: BLE001
            if type(e).__name__ == kind and text in str(e):
                return  # fails as documented
            raise AssertionError(f"{name} fails differently than documented ({kind}: {text!r}; {why}): "
                                 f"{type(e).__name__}: {e}") from e
        raise AssertionError(f"{name} passes now: remove it from EXPECTED_FAILURES and the README's table ({why})")

    return run


for _cls_name in CLASSES:
    _base = getattr(cf, _cls_name)
    _ns = {}
    for _test, (_kind, _text, _why) in EXPECTED_FAILURES.items():
        _c, _m = _test.split(".")
        if _c == _cls_name:
            _ns[_m] = _expect_failure(getattr(_base, _m), _test, _kind, _text, _why)
    globals()[_cls_name] = type(_cls_name, (_base,), _ns)
del _cls_name, _base, _ns


def test_every_expected_failure_names_a_collected_test_and_is_in_the_readme():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for name in EXPECTED_FAILURES:
        cls, method = name.split(".")
        assert cls in CLASSES and hasattr(getattr(cf, cls), method), name
        assert f"`{method}`" in readme, f"{name} is missing from the README's table of differences"
