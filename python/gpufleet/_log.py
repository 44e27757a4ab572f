"""The ``gpufleet`` logger (Note [Logging]).

Note [Logging]
~~~~~~~~~~~~~~
Diagnostics of the library (a GPU quarantined, a task that failed while no progress bar is drawn, a
journal that could not be read) go through ``logging.getLogger("gpufleet")`` and its children, one
per part (``gpufleet.dispatch``, ``gpufleet.pipeline``, ...), never through ``print``: an
application routes, filters or silences them the usual way::

    logging.getLogger("gpufleet").setLevel(logging.ERROR)          # quiet
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")  # gpufleet's records with yours

So that nothing is lost where nobody configured logging (a script, ``make demo``), the ``gpufleet``
logger carries one handler that writes WARNING and above to stderr as ``gpufleet: message``, as long
as the root logger has no handler; once the application configures logging, records go to its
handlers only (no line printed twice). What the command line prints for its users (summaries,
tables, errors of bad arguments) is output, not diagnostics, and stays ``print``.
"""
from __future__ import annotations

import logging
import sys

__all__: list[str] = []

logger = logging.getLogger("gpufleet")


class _UntilConfigured(logging.Handler):
    """stderr, ``gpufleet: message``, while the root logger has no handler (Note [Logging])."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            stream = sys.stderr  # looked up now: a redirected stderr (pytest, contextlib) is honoured
            stream.write(f"gpufleet: {self.format(record)}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


if not any(isinstance(h, _UntilConfigured) for h in logger.handlers):
    logger.addHandler(_UntilConfigured())


def get(part: str) -> logging.Logger:
    """The logger of one part: ``gpufleet.<part>``."""
    return logger.getChild(part)
