"""Process-wide logging set-up: one line per event, to stderr, with the process's role."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is at the time, not the stream it was created with, so a
    replaced stderr (a test's capture, a daemon's redirect) never leaves it writing to a closed
    file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(role: str, level: str | None = None) -> None:
    chosen = (level or os.environ.get("LINESIGHT_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {chosen!r}")
    logging.basicConfig(
        level=chosen,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        handlers=[StderrHandler()],
        force=True,
    )
