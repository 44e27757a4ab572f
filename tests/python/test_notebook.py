"""gpufleet in a real Jupyter kernel (nbclient starts an ipykernel, as Jupyter does): reports render as
HTML, plots come back as figures, and progress without ipywidgets is plain lines, never escape codes
(Note [Progress modes], Note [Rich display]). examples/quickstart.ipynb itself runs in `make notebook`."""
from __future__ import annotations

import html.parser
import os

import nbformat
import pytest
from nbclient import NotebookClient

from extras_helpers import env_without


class _Cells(html.parser.HTMLParser):
    def __init__(self, markup: str):
        super().__init__()
        self.cells: list[str] = []
        self._in = False
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


CELLS = [
    # 0: where we are: a kernel, without ipywidgets (blocked as if not installed), so progress is plain
    "import gpufleet, gpufleet._progress as P\nprint(P._in_notebook(), P._have_widgets(), P.mode())",
    # 1: a pipeline with progress: stream output plus the report as rich output
    "import time\nimport numpy as np\n"
    "r = (gpufleet.Pipeline(range(60), progress=True, name='nbtest')\n"
    "     .map(lambda i: time.sleep(0.01) or np.full((8, 8), i, np.float32), workers=2, name='decode')\n"
    "     .batch(6, collate=np.stack).gpu(lambda b: b.mean(axis=(1, 2)), name='model').unbatch().run())\n"
    "r",
    # 2: its plot, without a path
    "r.plot()",
    # 3: a dispatcher report and the topology
    "gpufleet.simulate_gpus(2)\nrun = gpufleet.run([['true'], ['false']], output='null')\nrun",
    "gpufleet.topology()",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    # The kernel is a real process with this environment: ipywidgets fails to import in it as an
    # uninstalled package does, and the progress interval is short enough to print while it runs.
    env = env_without(["ipywidgets"], GPUFLEET_PROGRESS_INTERVAL="0.1")
    old = os.environ.copy()
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def _outputs(nb, i, kind):
    return [o for o in nb.cells[i].outputs if o.output_type == kind]


def test_the_kernel_has_no_widgets_and_progress_is_plain(executed):
    assert "".join(o.text for o in _outputs(executed, 0, "stream")).split() == ["True", "False", "plain"]


def test_pipeline_progress_in_a_cell_has_no_escape_codes(executed):
    streams = _outputs(executed, 1, "stream")
    text = "".join(o.text for o in streams)
    assert text, "the cell printed no progress"
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert any(ln.startswith("nbtest: 60/60 item (100%)") for ln in lines), lines
    assert sum(ln.startswith("nbtest: ") for ln in lines) >= 2  # while it ran, then at the end
    assert any(ln.startswith("  decode") and "busy" in ln for ln in lines)


def test_pipeline_report_renders_as_html(executed):
    (res,) = _outputs(executed, 1, "execute_result")
    assert res.data["text/plain"].startswith("PipelineReport(status='completed', items=60,")
    cells = _Cells(res.data["text/html"]).cells
    assert cells[:3] == ["stage", "workers", "items"]
    i = cells.index("decode") if "decode" in cells else cells.index("decode (limiting)")
    assert cells[i + 1:i + 3] == ["2", "60"]


def test_plot_without_a_path_is_shown_inline(executed):
    (res,) = _outputs(executed, 2, "execute_result")
    assert res.data["text/plain"].startswith("<Figure size")
    import base64

    assert base64.b64decode(res.data["image/png"])[:4] == b"\x89PNG"
    assert not _outputs(executed, 2, "display_data")  # shown once, not again by the inline backend


def test_run_report_and_topology_render_as_html(executed):
    (res,) = _outputs(executed, 3, "execute_result")
    assert res.data["text/plain"].startswith("RunReport(") and "failed=1" in res.data["text/plain"]
    cells = _Cells(res.data["text/html"]).cells
    assert cells[:5] == ["device", "busy", "tasks", "failures", "quarantined"]
    assert "false" in cells  # the failed task's row
    (topo,) = _outputs(executed, 4, "execute_result")
    cells = _Cells(topo.data["text/html"]).cells
    assert cells[0] == "CUDA" and "cuda:1" in cells and "Simulated GPU" in cells
