"""Process-wide logging set-up: one line per event, to stderr, with the process's role."""

from __future__ import annotations

import logging
import os


def setup_logging(role: str, level: str | None = None) -> None:
    chosen = (level or os.environ.get("LINESIGHT_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {chosen!r}")
    logging.basicConfig(
        level=chosen,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
