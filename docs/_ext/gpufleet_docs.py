"""Two directives for gpufleet's reference.

``.. gpufleet-part:: gpufleet._devices`` documents every name of that module's ``__all__`` as it is
reached by users (``gpufleet.select_devices``), classes with their members, in the order of
``__all__``. ``.. gpufleet-cli:: run`` shows ``gpufleet run --help`` as the parser prints it.
"""
from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles


class GpufleetPart(Directive):
    required_arguments = 1
    option_spec = {"prefix": directives.unchanged, "exclude": directives.unchanged}

    def run(self):
        module = importlib.import_module(self.arguments[0])
        prefix = self.options.get("prefix", "gpufleet")
        exclude = set(self.options.get("exclude", "").split())
        lines = []
        for name in module.__all__:
            if name in exclude:
                continue
            obj = getattr(module, name)
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
            elif callable(obj):
                kind = "function"
            else:
                kind = "data"
            lines += [f".. auto{kind}:: {prefix}.{name}", ""]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=self.arguments[0]), node)
        return node.children


class GpufleetCli(Directive):
    """Every subcommand (a section each, its ``--help`` as printed at 100 columns)."""

    def run(self):
        import os

        from gpufleet.cli import build_parser

        os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width: make it fixed
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        lines = []
        for name, p in sub.choices.items():
            title = f"gpufleet {name}"
            lines += [title, "-" * len(title), "", "::", ""]
            lines += ["   " + ln for ln in p.format_help().splitlines()] + [""]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="gpufleet-cli"), node)
        return node.children


def setup(app):
    app.add_directive("gpufleet-part", GpufleetPart)
    app.add_directive("gpufleet-cli", GpufleetCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
