"""Input sources of ``gpufleet run`` as GNU parallel 20221122 reads them.

Note [Input sources as GNU parallel]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- ``::: a b`` is a source of values, ``:::: f1 f2`` one source per file (``-`` is stdin), ``-a F``
  (``--arg-file``) one more file source, placed before the ``:::``/``::::`` ones. Files are read one
  value per line (``\\n`` ends a value and is removed; ``--null`` uses NUL instead); an empty line is an
  empty value.
- Sources are crossed: every combination, the last source varying fastest. ``:::+`` / ``::::+``
  link a source to the one before it instead: their values go in pairs, as many as the shortest.
- With no source at all, stdin is the source, one value per line. A lone separator that ends the
  command line (``echo x :::``) is dropped, so stdin is read then too (parallel's parser does this).
- An empty source among non-empty ones counts as one empty value; when every source is empty there
  is no task.
- ``--colsep REGEX`` splits each value into columns (``{1}``, ``{2}`` ... numbered across the
  sources), and trims white space around each column, as parallel does under ``--colsep``.
- With no command, each input is a command line (run with ``/bin/sh -c``, as parallel runs it).
"""
from __future__ import annotations

import glob
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

SEPARATORS = (":::", ":::+", "::::", "::::+")
_TRIM = re.compile(r"^[ \t\n\r\f\v]+|[ \t\n\r\f\v]+$")  # Perl's \s, which parallel's --trim uses


@dataclass
class Source:
    kind: str                       # "values" or "file"
    values: list = field(default_factory=list)
    path: Optional[str] = None
    linked: bool = False            # :::+ / ::::+: paired with the source before it

    def describe(self) -> str:
        return f"file {self.path!r}" if self.kind == "file" else "::: list"


def split_command(words: list[str]) -> tuple[list[str], list[Source]]:
    """The command template and the sources that follow it (``:::``, ``:::+``, ``::::``, ``::::+``)."""
    i = next((k for k, w in enumerate(words) if w in SEPARATORS), len(words))
    template, rest = list(words[:i]), words[i:]
    if len(rest) == 1:  # `cmd :::` with nothing after: parallel's parser drops the separator
        return template, []
    sources: list[Source] = []
    sep = None
    for w in rest:
        if w in SEPARATORS:
            sep = w
            if not sep.startswith("::::"):
                sources.append(Source("values", linked=sep.endswith("+")))
        elif sep.startswith("::::"):
            sources.append(Source("file", path=w, linked=sep.endswith("+")))
        else:
            sources[-1].values.append(w)
    return template, sources


def _records(f, sep: bytes) -> Iterator[str]:
    # read1 returns what is there: a slow producer (tail -f | gpufleet run ...) is not waited for.
    buf = b""
    read = getattr(f, "read1", f.read)
    while True:
        chunk = read(65536)
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split(sep)
        for rec in done:
            yield rec.decode("utf-8", "surrogateescape")
    if buf:
        yield buf.decode("utf-8", "surrogateescape")


def _open(path: str):
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read the input file {path!r}: {e.strerror}") from None


def file_values(path: str, sep: bytes) -> Iterator[str]:
    f = _open(path)
    try:
        yield from _records(f, sep)
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _count_records(path: str, sep: bytes) -> Optional[int]:
    """The number of values in a regular file (None for stdin, pipes and FIFOs: they read once)."""
    if path == "-" or not os.path.isfile(path):
        return None
    n, last = 0, b""
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(sep)
            last = chunk[-1:]
    return n + (1 if last and last != sep else 0)


@dataclass
class Inputs:
    sources: list[Source]
    colsep: Optional[str] = None
    null: bool = False
    use_glob: bool = False

    def __post_init__(self):
        self.sep = b"\0" if self.null else b"\n"
        self._colsep = None
        if self.colsep is not None:
            try:
                self._colsep = re.compile(self.colsep)
            except re.error as e:
                raise ValueError(f"--colsep {self.colsep!r} is not a regular expression: {e}") from None
        if self.use_glob:
            for s in self.sources:
                if s.kind == "values":
                    s.values = self._globbed(s.values)

    @staticmethod
    def _globbed(values: list[str]) -> list[str]:
        out = []
        for v in values:
            m = sorted(glob.glob(v))
            if not m:
                raise ValueError(f"the glob {v!r} matches no file (--glob expands ::: values)")
            out += m
        return out

    def _columns(self, value: str) -> tuple:
        if self._colsep is None:
            return (value,)
        return tuple(_TRIM.sub("", c) for c in self._colsep.split(value))

    def _values(self, s: Source):
        return iter(s.values) if s.kind == "values" else file_values(s.path, self.sep)

    def reads_stdin(self) -> bool:
        return any(s.kind == "file" and s.path == "-" for s in self.sources)

    def rows(self) -> Iterator[tuple]:
        """Every combination, lazily when there is one source (a million-line file never sits in
        memory); with several, the sources are read first (crossing needs them all, as in parallel)."""
        if len(self.sources) == 1:
            return (self._columns(v) for v in self._values(self.sources[0]))
        lists = [list(self._values(s)) for s in self.sources]
        if not any(lists):
            return iter(())
        lists = [lst or [""] for lst in lists]
        groups: list[list[list[str]]] = []
        for s, lst in zip(self.sources, lists):
            if s.linked and groups:
                groups[-1].append(lst)
            else:
                groups.append([lst])
        linked = [list(zip(*g)) for g in groups]
        return (tuple(c for combo in prod for v in combo for c in self._columns(v))
                for prod in itertools.product(*linked))

    def total(self) -> Optional[int]:
        """The number of rows when it is known without consuming stdin (None otherwise)."""
        counts = []
        for s in self.sources:
            n = len(s.values) if s.kind == "values" else _count_records(s.path, self.sep)
            if n is None:
                return None
            counts.append(n)
        if len(counts) == 1:
            return counts[0]
        if not any(counts):
            return 0
        counts = [c or 1 for c in counts]
        total, group = 1, None
        for s, c in zip(self.sources, counts):
            if s.linked and group is not None:
                group = min(group, c)
            else:
                if group is not None:
                    total *= group
                group = c
        return total * (group or 1)
