"""Logging for the command line: diagnostics as one stderr line per record, configured once by `-v`.

The library only asks `logging.getLogger(__name__)` for loggers and never configures them; this module, called
by the CLI's top-level callback, is the one place that decides what is shown. Progress bars and result tables
stay rich output: they are the answer, not a diagnostic.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(name)s: %(message)s"
LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # by the number of -v


class _Stderr(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment: a rich progress bar (and pytest) swaps it, and a line written
    through the swapped stream lands above the bar instead of tearing it."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbosity: int = 0) -> None:
    """Show the package's records at WARNING (0), INFO (1) or DEBUG (2+) on stderr; other libraries' loggers are
    left alone. Calling again replaces the previous setting (one handler, never two)."""
    logger = logging.getLogger("entropylens")
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[min(max(verbosity, 0), len(LEVELS) - 1)])
