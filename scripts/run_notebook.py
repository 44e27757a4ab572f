"""Executes a notebook in a real Jupyter kernel (nbclient) and fails on any error (Note [Notebook check]).

    python scripts/run_notebook.py examples/quickstart.ipynb [--output executed.ipynb] [--timeout 600]

Note [Notebook check]
~~~~~~~~~~~~~~~~~~~~~
`make notebook` (part of `make test`) runs examples/quickstart.ipynb cell by cell in an ipykernel
started by nbclient, as Jupyter does, with the environment of the caller (PYTHONPATH names the build
under test). Every cell must run without an error, and every code cell's outputs are printed.

One exception, named and temporary: a cell tagged ``needs-by-value-callables`` (a function defined
in a cell, given to GPUExecutor) needs callables serialised by value, which arrive with the module
``gpufleet._serialize`` (issue 15, the executor's part). Where that module is missing the cell must
fail (reported as an expected failure); where it exists the cell must pass like any other. The
check never skips the cell.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

BY_VALUE_TAG = "needs-by-value-callables"


def by_value_callables() -> bool:
    return importlib.util.find_spec("gpufleet._serialize") is not None


def execute(path: str, timeout: float = 600, cwd: str | None = None) -> nbformat.NotebookNode:
    """The executed notebook (errors kept in the outputs: see ``problems``)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": cwd or os.path.dirname(os.path.abspath(path))}})
    client.execute()
    return nb


def errors_of(cell) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def problems(nb) -> tuple[list[str], list[str]]:
    """(failures, expected failures) as one line per cell."""
    failures, expected = [], []
    lenient = not by_value_callables()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errs = errors_of(cell)
        tagged = BY_VALUE_TAG in cell.get("metadata", {}).get("tags", [])
        first = cell.source.splitlines()[0] if cell.source else ""
        if tagged and lenient:
            (expected if errs else failures).append(
                f"cell {i} ({first!r}): " + ("; ".join(errs) if errs else
                                             f"passed although gpufleet._serialize is missing: drop the "
                                             f"'{BY_VALUE_TAG}' leniency in scripts/run_notebook.py"))
        elif errs:
            failures.append(f"cell {i} ({first!r}): {'; '.join(errs)}")
    return failures, expected


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook")
    ap.add_argument("--output", help="write the executed notebook here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    t = time.monotonic()
    nb = execute(args.notebook, args.timeout)
    if args.output:
        nbformat.write(nb, args.output)
    failures, expected = problems(nb)
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    for f in expected:
        print(f"EXPECTED FAILURE until callables travel by value (gpufleet._serialize): {f}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    print(f"{args.notebook}: {code_cells} code cells in {time.monotonic() - t:.1f} s, {len(failures)} failed, "
          f"{len(expected)} expected failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
