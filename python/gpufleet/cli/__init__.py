"""The `gpufleet` command line. Each subcommand is a module in this package that defines
``register(subparsers)``; the parser it registers carries ``func(args) -> int``.
New subcommands are found automatically (one module each: info, run, launch, ...)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Sequence


# The queue's commands are small clients, often started once per job: their parser alone is built,
# so that none of the other commands' imports (NumPy among them) delays them (Note [Lazy package]).
_QUEUE_MODULES = {"submit": "queue_cmds", "queue": "queue_cmds", "ls": "queue_cmds", "tail": "queue_cmds",
                  "cancel": "queue_cmds", "wait": "queue_cmds", "retry": "queue_cmds", "top": "top"}


class _Version(argparse.Action):
    """--version, reading the version (from the compiled core) only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help="show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .. import __version__

        print(f"gpufleet {__version__}")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Spread GPU work across devices.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only:
        names = [only]
    else:
        import pkgutil

        names = [m.name for m in pkgutil.iter_modules(__path__)]
    for name in sorted(names):
        if name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_QUEUE_MODULES.get(words[0]) if words else None)
    args = parser.parse_args(words)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("gpufleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpufleet info | head`: the reader left; exit quietly like coreutils
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, TypeError) as e:  # bad input: say what was wrong, no traceback
        print(f"gpufleet {args.command}: error: {e}", file=sys.stderr)
        return 2
