"""The ``ray`` extra (Note [Optional extras]): without a ``cluster=`` Ray is never imported, and a
``cluster=`` without Ray installed fails before any work starts, naming the extra. Real subprocesses,
in which Ray fails to import as an uninstalled package does (tests/python/blocker). No cluster is
started here (tests/python/test_cluster_*.py start one)."""
from __future__ import annotations

import textwrap

import pytest

from extras_helpers import run_without


def _py(code: str) -> list:
    return ["-c", textwrap.dedent(code)]


def test_local_work_never_imports_ray(tmp_path):
    r = run_without([], _py(f"""
        import sys
        import gpufleet
        report = gpufleet.run([["true"], ["sh", "-c", "exit 0"]], quiet=True)
        assert report.ok
        with gpufleet.GPUExecutor(devices="cpu", workers=1) as ex:
            assert ex.submit(abs, -3).result() == 3
        out = gpufleet.Pipeline(range(5)).map(lambda x: x + 1).gpu(lambda b: b).run().results
        assert sorted(out) == [1, 2, 3, 4, 5]
        gpufleet.run([["true"]], quiet=True, journal={str(tmp_path / "j.sqlite")!r})
        print("ray" in sys.modules, sorted(m for m in sys.modules if m.startswith("gpufleet.cluster")))
        """), GPUFLEET_SIMULATED_GPUS="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "False []"


def test_the_cli_without_cluster_never_imports_ray(tmp_path):
    r = run_without([], ["-X", "importtime", "-m", "gpufleet", "run", "--quiet", "--", "echo", "{}", ":::", "a", "b"],
                    GPUFLEET_SIMULATED_GPUS="1")
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith((" ray", " gpufleet.cluster"))]


@pytest.mark.parametrize("call, feature", [
    ("gpufleet.run([['touch', MARK]], cluster='auto')", "gpufleet.run(cluster=...)"),
    ("gpufleet.GPUExecutor(cluster='127.0.0.1:6379')", "GPUExecutor(cluster=...)"),
    ("gpufleet.spawn(lambda rank: open(MARK, 'w'), cluster='auto')", "spawn(cluster=...)"),
    ("gpufleet.Pipeline(range(3)).gpu(lambda b: b, cluster='ray://head:10001')", "Pipeline.gpu(cluster=...)"),
])
def test_cluster_without_ray_names_the_ray_extra_before_any_work(tmp_path, call, feature):
    mark = str(tmp_path / "ran")
    r = run_without(["ray"], _py(f"""
        import gpufleet
        MARK = {mark!r}
        try:
            {call}
        except gpufleet.MissingExtraError as e:
            assert isinstance(e, ImportError) and e.extra == "ray" and e.name == "ray"
            print(e)
        """), GPUFLEET_SIMULATED_GPUS="2")
    assert r.returncode == 0, r.stderr
    assert f"{feature} needs the Python package 'ray'" in r.stdout
    assert "pip install 'gpufleet[ray]'" in r.stdout
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv, feature", [
    (["run", "--cluster", "auto", "--", "touch", "{}", ":::", "MARK"], "gpufleet run --cluster"),
    (["info", "--cluster", "auto"], "gpufleet info --cluster"),
    (["launch", "--cluster", "auto", "MARK.py"], "gpufleet launch --cluster"),
])
def test_cli_cluster_without_ray_exits_2_naming_the_extra(tmp_path, argv, feature):
    argv = [a.replace("MARK", str(tmp_path / "ran")) for a in argv]
    r = run_without(["ray"], ["-m", "gpufleet", *argv], cwd=str(tmp_path), GPUFLEET_SIMULATED_GPUS="2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{feature} needs the Python package 'ray'" in r.stderr and "pip install 'gpufleet[ray]'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ran").exists()


def test_a_bad_cluster_value_is_refused_before_ray_is_even_looked_for():
    r = run_without(["ray"], _py("""
        import gpufleet
        for bad in ("", " ", 6379, "two words", None.__class__):
            try:
                gpufleet.run([["true"]], cluster=bad)
            except ValueError as e:
                assert "cluster must be 'auto'" in str(e), e
            else:
                raise AssertionError(bad)
        print("ok")
        """))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
