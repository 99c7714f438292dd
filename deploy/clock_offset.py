"""How far each station's clock is behind the controller's, from when its messages arrive.

A station stamps every message with its own clock (`ts`): the time a part was inspected, for
traceability, and the clock its TLS certificates are checked against. A line PC whose RTC
battery went flat, or that never reaches a time source, can be hours or years off. Each message
that arrives says `arrival - ts` = (how far the station is behind) + (how long it travelled);
travel only adds (the outbox may replay hour-old messages), so the lowest value over the last
minute or two is the station's offset plus its quickest delivery: a fraction of a second on a
working line. Negative: the station's clock is ahead.
"""

from __future__ import annotations

import math
import threading

__all__ = ["WARN_S", "WINDOW_S", "ClockOffsets"]

WINDOW_S = 60.0
"""Arrivals are kept per window; the estimate is the lowest of the current and the last one."""
WARN_S = 60.0
"""An offset this large (either way) is shown as a warning: more than any delivery takes."""


class ClockOffsets:
    """The lowest `arrival - ts` per station over the current and the previous window; safe to
    share between the ingest thread and the API's threads."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: must be above 0, got {window_s}")
        self._window_s = window_s
        self._lock = threading.Lock()
        self._lowest: dict[str, dict[int, float]] = {}  # station -> window index -> lowest

    def observe(self, station: str, behind_s: float, now: float) -> None:
        """One message of `station` arrived `behind_s` after its `ts`, at monotonic `now`."""
        if not math.isfinite(behind_s):
            return
        window = int(now // self._window_s)
        with self._lock:
            windows = self._lowest.setdefault(station, {})
            windows[window] = min(windows.get(window, math.inf), behind_s)
            for old in [w for w in windows if w < window - 1]:
                del windows[old]

    def behind_s(self, station: str, now: float) -> float | None:
        """How far `station`'s clock is behind (negative: ahead), or None when nothing arrived
        from it in the current or the previous window."""
        window = int(now // self._window_s)
        with self._lock:
            windows = self._lowest.get(station, {})
            recent = [low for w, low in windows.items() if w >= window - 1]
        return min(recent) if recent else None
