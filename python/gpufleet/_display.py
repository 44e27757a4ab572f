"""How reports, devices and the topology show themselves (Note [Rich display]).

Note [Rich display]
~~~~~~~~~~~~~~~~~~~
Every object a user looks at in a notebook or a REPL has three faces:

- ``repr()``: readable text, never ``<... at 0x...>``: a one-line summary for reports (the full
  table is ``summary()``), the ``gpufleet info`` table for a topology or a device list;
- ``_repr_html_()``: the same facts as an HTML table, which Jupyter shows instead of the text (built
  here, escaped, no scripts or styles that a notebook viewer might strip);
- ``plot(path=None)`` / ``plot_timeline(path=None)``: with a path the figure is saved and the path
  returned (scripts, ``make demo``); without one the matplotlib ``Figure`` is returned, which Jupyter
  shows inline. Saving uses matplotlib's object API (no pyplot, so no backend is switched and no
  window opened); returning uses pyplot, so that a notebook's inline backend is set up to draw it,
  and closes it in pyplot, so that the cell shows it once.

matplotlib is the ``plot`` extra: ``new_figure`` checks it first (Note [Optional extras]).
"""
from __future__ import annotations

import html
import os
from typing import Any, Iterable, Optional, Sequence, Union

from . import _extras

__all__: list[str] = []


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str = "",
               notes: Sequence[str] = (), numeric: Sequence[int] = ()) -> str:
    """An HTML table; ``numeric`` columns are right-aligned. Every cell is escaped."""
    def cell(tag: str, i: int, v: Any) -> str:
        style = ' style="text-align:right"' if i in numeric else ' style="text-align:left"'
        return f"<{tag}{style}>{html.escape(str(v))}</{tag}>"

    out = ['<div class="gpufleet">']
    if title:
        out.append(f"<p><b>{html.escape(title)}</b></p>")
    out.append("<table>")
    out.append("<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr></thead>")
    out.append("<tbody>")
    for r in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    for n in notes:
        out.append(f"<p>{html.escape(n)}</p>")
    out.append("</div>")
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain table with columns padded to their widest cell (as ``gpufleet info`` prints)."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# ---- devices ---------------------------------------------------------------------------------------

DEVICE_HEADERS = ("CUDA", "GPU", "Name", "Bus-Id", "Memory used / total", "Free", "Util", "Procs", "CC")


def _mem(v: Optional[int]) -> str:
    from ._core import format_memory_size

    return "?" if v is None else format_memory_size(v)


def device_row(g: Any) -> tuple:
    """One row of ``DEVICE_HEADERS`` for a ``DeviceInfo`` (unknown values as ``?``)."""
    cc = g.compute_capability
    return (f"cuda:{g.ordinal}" if g.ordinal >= 0 else "-",
            "?" if g.nvml_index < 0 else str(g.nvml_index),
            g.name or "?",
            g.pci_bus_id or "?",
            f"{_mem(g.used_memory)} / {_mem(g.total_memory)}",
            _mem(g.free_memory),
            "?" if g.utilization is None else f"{g.utilization}%",
            "?" if g.processes is None else str(len(g.processes)),
            "?" if not cc else f"{cc[0]}.{cc[1]}")


def topology_summary(topo: Any) -> str:
    src = {"nvml": "NVML", "cuda": "CUDA runtime (NVML unavailable)", "simulated": "SIMULATED (not real GPUs)",
           "none": "no GPU found"}.get(topo.source, topo.source)
    cvd = topo.cuda_visible_devices
    return (f"Topology: {len(topo.gpus)} GPU{'s' if len(topo.gpus) != 1 else ''}, {len(topo.visible)} visible; "
            f"source {src}; driver {topo.driver_version or 'unknown'}; "
            f"CUDA_VISIBLE_DEVICES {'unset' if cvd is None else repr(cvd)}")


def topology_repr(topo: Any) -> str:
    lines = [topology_summary(topo)]
    if topo.gpus:
        lines.append(text_table(DEVICE_HEADERS, [device_row(g) for g in topo.gpus]))
    lines += [f"note: {n}" for n in topo.notes]
    return "\n".join(lines)


def topology_html(topo: Any) -> str:
    return html_table(DEVICE_HEADERS, [device_row(g) for g in topo.gpus], title=topology_summary(topo),
                      notes=[f"note: {n}" for n in topo.notes], numeric=(4, 5, 6, 7))


def devices_repr(gpus: Sequence[Any]) -> str:
    if not gpus:
        return "[] (no visible GPU)"
    return text_table(DEVICE_HEADERS, [device_row(g) for g in gpus])


def devices_html(gpus: Sequence[Any]) -> str:
    n = len(gpus)
    return html_table(DEVICE_HEADERS, [device_row(g) for g in gpus], numeric=(4, 5, 6, 7),
                      title=f"{n} visible GPU{'s' if n != 1 else ''}" if n else "no visible GPU")


# ---- figures ---------------------------------------------------------------------------------------

PathLike = Union[str, "os.PathLike[str]"]


def new_figure(feature: str, path: Optional[PathLike], **kwargs: Any) -> Any:
    """A matplotlib Figure for ``feature`` (Note [Rich display]); MissingExtraError without matplotlib."""
    _extras.require("matplotlib", "plot", feature)
    if path is None:
        import matplotlib.pyplot as plt

        return plt.figure(**kwargs)
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def finish_figure(fig: Any, path: Optional[PathLike], **savefig: Any) -> Any:
    """Saves ``fig`` to ``path`` and returns the path, or returns the figure when there is no path."""
    if path is None:
        import matplotlib.pyplot as plt

        plt.close(fig)  # the returned figure is shown once (Jupyter's inline backend) and leaks nothing
        return fig
    path = os.fspath(path)
    fig.savefig(path, **savefig)
    return path
