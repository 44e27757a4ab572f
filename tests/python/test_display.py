"""What users see of reports, devices and the topology in a REPL and a notebook (Note [Rich display])
and the diagnostics logger (Note [Logging])."""
from __future__ import annotations

import html.parser
import logging
import subprocess
import sys
import time

import matplotlib.figure
import pytest

import gpufleet
from gpufleet import Pipeline


class _Cells(html.parser.HTMLParser):
    """The text of every table cell, row by row (a real HTML parser, not substring checks)."""

    def __init__(self, markup: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_cell = False
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data


SPEC = [{"name": "Sim <A&B>", "free_memory": "6GiB", "utilization": 97, "processes": 2},
        {"free_memory": "30GiB"}, {}]


def test_topology_repr_is_the_info_table_not_an_address(sim_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    sim_gpus(SPEC)
    topo = gpufleet.topology()
    text = repr(topo)
    assert "0x" not in text
    lines = text.splitlines()
    assert lines[0].startswith("Topology: 3 GPUs, 2 visible; source SIMULATED") and "'2,0'" in lines[0]
    assert lines[1].split()[:3] == ["CUDA", "GPU", "Name"]
    # physical order, with the CUDA ordinal CUDA_VISIBLE_DEVICES gives each (GPU 1 hidden)
    assert lines[2].split()[:2] == ["cuda:1", "0"] and "97%" in lines[2] and "6.0 GiB" in lines[2]
    assert lines[3].split()[:2] == ["-", "1"]
    assert lines[4].split()[:2] == ["cuda:0", "2"]
    rows = _Cells(topo._repr_html_()).rows
    assert rows[0][:3] == ["CUDA", "GPU", "Name"]
    assert rows[1][:3] == ["cuda:1", "0", "Sim <A&B>"]  # escaped in the markup, exact once parsed
    assert "<A&B>" not in topo._repr_html_()
    assert [r[0] for r in rows[1:]] == ["cuda:1", "-", "cuda:0"]


def test_device_list_and_device_info_render_as_tables(sim_gpus):
    sim_gpus(SPEC)
    devs = gpufleet.devices()
    assert isinstance(devs, list) and len(devs) == 3 and devs == list(devs)
    text = repr(devs).splitlines()
    assert text[0].split()[:2] == ["CUDA", "GPU"] and len(text) == 4
    assert text[2].split()[0] == "cuda:1" and "30.0 GiB" in text[2]
    rows = _Cells(devs._repr_html_()).rows
    assert len(rows) == 4 and rows[3][0] == "cuda:2"
    one = _Cells(devs[0]._repr_html_()).rows
    assert one[1][2] == "Sim <A&B>" and one[1][6] == "97%" and one[1][7] == "2"
    gpufleet.simulate_gpus(0)
    assert repr(gpufleet.devices()) == "[] (no visible GPU)"


def test_run_report_repr_and_html(sim_gpus, tmp_path):
    sim_gpus(2)
    r = gpufleet.run([["true"], ["false"], ["sh", "-c", "exit 3"]], quiet=True, log_dir=tmp_path)
    text = repr(r)
    assert text.startswith(f"RunReport(run_id={r.run_id!r}, tasks=3, succeeded=1, failed=2,")
    markup = r._repr_html_()
    rows = _Cells(markup).rows
    assert rows[0] == ["device", "busy", "tasks", "failures", "quarantined"]
    assert sorted(r_[0] for r_ in rows[1:3]) == ["cuda:0", "cuda:1"]
    assert sum(int(r_[2]) for r_ in rows[1:3]) == 3 and sum(int(r_[3]) for r_ in rows[1:3]) == 2
    failed = [r_ for r_ in rows if r_ and r_[0] in ("2", "3")]
    assert {f[1] for f in failed} == {"false", "sh -c exit 3"} and all(f[2] == "failed" for f in failed)
    assert f"gpufleet run {r.run_id}: 3 tasks" in markup


def test_pipeline_report_repr_and_html():
    r = Pipeline(range(20)).map(lambda x: time.sleep(0.002) or x, workers=2, name="slow <op>").run()
    assert repr(r).startswith("PipelineReport(status='completed', items=20,")
    rows = _Cells(r._repr_html_()).rows
    assert rows[0][:3] == ["stage", "workers", "items"]
    names = [row[0] for row in rows[1:]]
    assert names[0] == "source" and names[1].startswith("slow <op>")
    assert r.limiting_stage is not None and f"{r.limiting_stage} (limiting)" in names
    assert [row[2] for row in rows[1:]] == ["20", "20"]


def test_plots_return_figures_without_a_path_and_paths_with_one(sim_gpus, tmp_path):
    sim_gpus(1)
    run = gpufleet.run([["true"]] * 3, quiet=True)
    fig = run.plot_timeline()
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes[0].get_title().startswith(f"gpufleet run {run.run_id}: 3 tasks")
    assert len(fig.axes[0].collections) == 3  # one bar per attempt
    png = tmp_path / "t.png"
    assert run.plot_timeline(png) == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    rep = Pipeline(range(50)).map(lambda x: x, name="ident").run()
    fig = rep.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    # one line per stage; whichever stage measured busiest is labelled "(limiting)" (timing-dependent)
    assert {ln.get_label().removesuffix(" (limiting)") for ln in fig.axes[0].get_lines()} == {"source", "ident"}
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # returned, not left open in pyplot (a notebook shows it once)
    p2 = tmp_path / "p.png"
    assert rep.plot(str(p2)) == str(p2) and p2.read_bytes()[:4] == b"\x89PNG"


def test_saving_a_plot_does_not_switch_the_pyplot_backend(tmp_path):
    code = ("import matplotlib; matplotlib.use('svg'); import gpufleet;"
            "gpufleet.Pipeline(range(3)).run().plot(%r); import matplotlib.pyplot as plt;"
            "print(matplotlib.get_backend(), plt.get_fignums())" % str(tmp_path / "x.png"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["svg", "[]"]


def test_dispatch_diagnostics_go_through_the_gpufleet_logger(sim_gpus, caplog):
    sim_gpus(1)
    with caplog.at_level(logging.WARNING, logger="gpufleet"):
        gpufleet.run([["false"]], progress=False)
    recs = [r for r in caplog.records if r.name == "gpufleet.dispatch"]
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert recs[0].getMessage().startswith("task #1 'false' failed")


def test_without_logging_configured_diagnostics_still_reach_stderr(tmp_path):
    code = "import gpufleet; gpufleet.simulate_gpus(1); gpufleet.run([['false']])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.startswith("gpufleet: task #1 'false' failed: exit status 1"), r.stderr
    # configured by the application: its handlers only (no second line), its format
    code = ("import logging, gpufleet; logging.basicConfig(format='[%(name)s] %(message)s');"
            "gpufleet.simulate_gpus(1); gpufleet.run([['false']])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.splitlines() == ["[gpufleet.dispatch] task #1 'false' failed: exit status 1"]
    # silenced the usual way
    code = ("import logging, gpufleet; logging.getLogger('gpufleet').setLevel(logging.ERROR);"
            "gpufleet.simulate_gpus(1); gpufleet.run([['false']])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr == ""
