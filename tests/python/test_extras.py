"""Every extra's absence (Note [Optional extras]): the feature fails before any work starts, with
an error naming the extra. Each case runs in a real subprocess in which the packages of the extra
fail to import as uninstalled ones do (tests/python/blocker/sitecustomize.py)."""
from __future__ import annotations

import os
import textwrap

import pytest

from extras_helpers import run_without

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _py(code: str) -> list:
    return ["-c", textwrap.dedent(code)]


def test_the_blocker_really_makes_the_import_fail():
    r = run_without(["matplotlib"], _py("""
        import importlib.util, sys
        try:
            import matplotlib.pyplot
        except ModuleNotFoundError as e:
            print("missing", e.name)
        import numpy, tqdm  # the rest imports as usual
        """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["missing", "matplotlib"]  # as Python names an absent package


def test_cli_timeline_without_matplotlib_fails_before_any_task(tmp_path):
    marker = tmp_path / "ran"
    r = run_without(["matplotlib"], ["-m", "gpufleet", "run", "--timeline", str(tmp_path / "t.png"), "--",
                                     "touch", str(marker)], GPUFLEET_SIMULATED_GPUS="2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "gpufleet run --timeline needs the Python package 'matplotlib'" in r.stderr
    assert "pip install 'gpufleet[plot]'" in r.stderr
    assert not marker.exists()  # no task started
    assert "Traceback" not in r.stderr


def test_cli_timeline_with_matplotlib_writes_the_png(tmp_path):
    png = tmp_path / "t.png"
    r = run_without([], ["-m", "gpufleet", "run", "--timeline", str(png), "--", "true"], GPUFLEET_SIMULATED_GPUS="2")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("call, feature", [
    ("gpufleet.run([['true']], quiet=True).plot_timeline({path!r})", "RunReport.plot_timeline"),
    ("gpufleet.run([['true']], quiet=True).plot_timeline()", "RunReport.plot_timeline"),
    ("gpufleet.Pipeline(range(3)).run().plot({path!r})", "PipelineReport.plot"),
    ("gpufleet.Pipeline(range(3)).run().plot()", "PipelineReport.plot"),
])
def test_plots_without_matplotlib_name_the_plot_extra(tmp_path, call, feature):
    path = str(tmp_path / "p.png")
    r = run_without(["matplotlib"], _py(f"""
        import gpufleet
        try:
            {call.format(path=path)}
        except gpufleet.MissingExtraError as e:
            assert isinstance(e, ImportError) and e.extra == "plot" and e.name == "matplotlib"
            print(e)
        """))
    assert r.returncode == 0, r.stderr
    assert f"{feature} needs the Python package 'matplotlib'" in r.stdout
    assert "pip install 'gpufleet[plot]'" in r.stdout
    assert not os.path.exists(path)


def test_sql_sink_url_without_sqlalchemy_fails_at_construction(tmp_path):
    # The URL points at nothing: the error must come from the missing package, before any connection.
    r = run_without(["sqlalchemy"], _py("""
        import gpufleet
        from gpufleet.sinks import SqlSink
        seen = []
        try:
            sink = SqlSink("mysql+pymysql://u:p@127.0.0.1:1/db", "scores", key="id")
        except gpufleet.MissingExtraError as e:
            print(e)
        else:
            gpufleet.Pipeline(range(5)).map(seen.append).sink(sink).run()
        print("items seen", len(seen))
        # SQLite needs no extra
        with SqlSink("scores.db", "scores", key="id") as s:
            s.write({"id": 1, "score": 2.0})
        print("sqlite ok")
        """), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "SqlSink('mysql+pymysql://u:p@127.0.0.1:1/db') needs the Python package 'sqlalchemy'" in r.stdout
    assert "pip install 'gpufleet[sql]'" in r.stdout
    assert "items seen 0" in r.stdout and "sqlite ok" in r.stdout


def test_sql_sink_url_without_its_driver_names_the_sql_extra():
    r = run_without(["pymysql"], _py("""
        import gpufleet
        from gpufleet.sinks import SqlSink
        try:
            SqlSink("mysql+pymysql://u:p@127.0.0.1:1/db", "scores", key="id")
        except gpufleet.MissingExtraError as e:
            print(e.extra, e)
        """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sql ") and "'pymysql'" in r.stdout and "gpufleet[sql]" in r.stdout


def test_sql_sink_bad_url_is_a_value_error():
    from gpufleet.sinks import SqlSink

    with pytest.raises(ValueError, match="no such dialect or driver"):
        SqlSink("nosuchdb://host/db", "t", key="id")


def test_onnx_strict_without_onnxruntime_names_the_onnx_extra():
    r = run_without(["onnxruntime"], _py("""
        import gpufleet, gpufleet.onnx as O
        print(O.providers("cpu"), O.providers("cpu").validated_against)   # unvalidated, as documented
        try:
            O.providers("cuda:0", strict=True)
        except gpufleet.MissingExtraError as e:
            print(e)
        """))
    assert r.returncode == 0, r.stderr
    assert "['CPUExecutionProvider'] None" in r.stdout
    assert "providers(strict=True) needs the Python package 'onnxruntime'" in r.stdout
    assert "gpufleet[onnx]" in r.stdout


def test_notebook_extra_absent_means_plain_progress_not_an_error():
    # Without ipywidgets, progress in a notebook falls back to plain lines (tested with a real kernel in
    # test_notebook.py); here: the mode decision itself, outside a kernel, never needs the extra.
    r = run_without(["ipywidgets"], _py("""
        from gpufleet import _progress
        print(_progress._have_widgets(), _progress.mode())
        """))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "plain"]


@pytest.mark.parametrize("example, args", [
    ("depth_congestion.py", ["--batch", "1", "--height", "16", "--width", "16"]),
    ("video_pipeline.py", ["--frames", "3", "--size", "16x16"]),
])
def test_examples_without_the_examples_extra_name_it(tmp_path, example, args):
    r = run_without(["cv2"], [os.path.join(ROOT, "examples", example), *args], cwd=str(tmp_path))
    assert r.returncode != 0
    assert "pip install 'gpufleet[examples]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []  # nothing written: it stopped before any work
