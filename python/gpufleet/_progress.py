"""Progress display shared by the dispatcher, the executor and the pipeline (Note [Progress modes]).

Note [Progress modes]
~~~~~~~~~~~~~~~~~~~~~
Where the output goes decides how progress looks, never the caller:

- ``notebook``: inside a Jupyter kernel with ipywidgets installed, ``tqdm.notebook`` widgets.
- ``terminal``: the stream is a TTY, ``tqdm`` bars redrawn in place (cursor codes).
- ``plain``: anything else (a pipe, a log file, a notebook without ipywidgets, CI): one plain line
  per bar every ``interval`` seconds (``GPUFLEET_PROGRESS_INTERVAL``, default 5) and a last line at
  close. Never a carriage return or an escape code, so ``make demo > log`` stays readable.

``Bar`` offers the part of tqdm's interface that gpufleet uses (``update``, ``n``, ``total``,
``set_postfix_str``, ``set_description_str``, ``write``, ``close``); ``status_lines`` are the extra
one-line rows under a bar (one per GPU, say).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Optional

__all__: list[str] = []

_DEFAULT_INTERVAL = 5.0


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython, not qtconsole/spyder)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
    except Exception:
        return False
    name = type(shell).__name__.lower() if shell is not None else ""
    return "zmq" in name and "qt" not in name and "spyder" not in name


def _have_widgets() -> bool:
    try:
        from tqdm.notebook import IProgress
    except Exception:
        return False
    return IProgress is not None


def mode(file: Optional[IO] = None) -> str:
    """``"notebook"``, ``"terminal"`` or ``"plain"`` for output to ``file`` (default stderr)."""
    f = sys.stderr if file is None else file
    if _in_notebook() and _have_widgets() and (file is None or f in (sys.stderr, sys.stdout)):
        return "notebook"
    try:
        if f.isatty():
            return "terminal"
    except (AttributeError, ValueError):
        pass
    return "plain"


def interval_from_env() -> float:
    raw = os.environ.get("GPUFLEET_PROGRESS_INTERVAL", "")
    if not raw:
        return _DEFAULT_INTERVAL
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"GPUFLEET_PROGRESS_INTERVAL={raw!r}: expected a number of seconds > 0") from None
    if not v > 0 or v == float("inf"):
        raise ValueError(f"GPUFLEET_PROGRESS_INTERVAL={raw!r}: expected a number of seconds > 0")
    return v


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Bar:
    """One progress bar in the mode the output allows (Note [Progress modes])."""

    def __init__(self, total: Optional[int] = None, *, desc: str = "", unit: str = "it", file: Optional[IO] = None,
                 status_lines: int = 0, interval: Optional[float] = None, mode_: Optional[str] = None):
        self.file = sys.stderr if file is None else file
        self.mode = mode_ or mode(file)
        self.unit = unit
        self._desc = desc
        self._postfix = ""
        self._total = total
        self._n = 0
        self._lines = [""] * status_lines
        self._start = time.monotonic()
        self._last_print = self._start
        self._interval = interval if interval is not None else interval_from_env()
        self._closed = False
        self._lock = threading.Lock()
        self._bar = None
        self._line_bars: list = []
        if self.mode != "plain":
            if self.mode == "notebook":
                from tqdm.notebook import tqdm
            else:
                from tqdm import tqdm
            kw = {} if self.mode == "notebook" else {"file": self.file, "dynamic_ncols": True}
            self._bar = tqdm(total=total, desc=desc or None, unit=unit, leave=True, **kw)
            if self.mode == "terminal":
                self._line_bars = [tqdm(total=0, bar_format="{desc}", position=i + 1, leave=False, file=self.file)
                                   for i in range(status_lines)]

    # -- tqdm's interface -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._n

    @n.setter
    def n(self, value: int) -> None:
        self._n = value
        if self._bar is not None:
            self._bar.n = value

    @property
    def total(self) -> Optional[int]:
        return self._total

    @total.setter
    def total(self, value: Optional[int]) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value

    def update(self, n: int = 1) -> None:
        self.n = self._n + n
        self.refresh()

    def set_description_str(self, desc: str, refresh: bool = True) -> None:
        self._desc = desc
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)
        if refresh:
            self.refresh()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self._postfix = s
        if self._bar is not None:
            self._bar.set_postfix_str(s, refresh=False)
        if refresh:
            self.refresh()

    def set_line(self, i: int, text: str) -> None:
        """Status line ``i`` under the bar (shown in terminals and in plain blocks; notebooks skip them)."""
        self._lines[i] = text
        if i < len(self._line_bars):
            self._line_bars[i].set_description_str(text, refresh=False)

    def refresh(self, force: bool = False) -> None:
        if self._closed:
            return
        if self._bar is not None:
            self._bar.refresh()
            for b in self._line_bars:
                b.refresh()
            return
        now = time.monotonic()
        if force or now - self._last_print >= self._interval:
            self._last_print = now
            self._print_plain(now)

    def write(self, text: str) -> None:
        """A message above the bar (tqdm.write in a terminal; a plain line elsewhere)."""
        if self._bar is not None and self.mode == "terminal":
            self._bar.write(text, file=self.file)
        else:
            with self._lock:
                print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        if self._bar is None:
            self._print_plain(time.monotonic())
        self._closed = True
        for b in self._line_bars:
            b.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plain mode -----------------------------------------------------------------------------
    def plain_line(self, now: Optional[float] = None) -> str:
        """The line plain mode prints: ``desc: n/total unit (pct) rate ETA postfix``."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self._n / elapsed
        parts = [f"{self._desc}:" if self._desc else ""]
        if self._total is not None:
            pct = 100.0 * self._n / self._total if self._total else 100.0
            parts.append(f"{self._n}/{self._total} {self.unit} ({pct:.0f}%)")
        else:
            parts.append(f"{self._n} {self.unit}")
        parts.append(f"{rate:.3g} {self.unit}/s" if self._n else "")
        parts.append(f"elapsed {_format_eta(elapsed)}")
        if self._total is not None and self._n and self._n < self._total:
            parts.append(f"ETA {_format_eta((self._total - self._n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return " ".join(p for p in parts if p)

    def _print_plain(self, now: float) -> None:
        text = "\n".join([self.plain_line(now)] + [f"  {ln}" for ln in self._lines if ln])
        with self._lock:
            print(text, file=self.file, flush=True)
