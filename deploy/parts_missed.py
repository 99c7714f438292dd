"""The parts each station missed in the last hour (StationMetrics.parts_missed), for the
inventory the API and the dashboard show.

Asked on every dashboard refresh, so it is kept as a running tally: each call reads only the
metrics reports stored since the last one (the new slots of each station's ring, usually none or
one), and keeps, per station, only its reports that missed parts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from deploy.fleet_store import FleetStore

WINDOW = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PartsMissed:
    """What a station's reports of the window say it did not inspect."""

    parts: int
    last_missed: datetime | None
    """When the latest report that missed parts ended, by the controller's clock."""


@dataclass(slots=True)
class _StationTally:
    count: int = 0
    """The number of its latest report read."""
    latest_reported: datetime | None = None
    """The newest ts of a report that carries parts_missed (station's clock)."""
    missed: list[tuple[datetime, int]] = field(default_factory=list)
    """(ts, parts) of its reports that missed parts, the window's and newer."""


def summarise(tally: _StationTally, since: datetime, behind_s: float) -> PartsMissed | None:
    """The window's figure (None: no report since `since` says), from the station's clock
    (`behind_s` behind the controller's) to the controller's."""
    if tally.latest_reported is None or tally.latest_reported < since:
        return None
    recent = [(ts, parts) for ts, parts in tally.missed if ts >= since]
    last = max((ts for ts, _ in recent), default=None)
    return PartsMissed(
        parts=sum(parts for _, parts in recent),
        last_missed=None if last is None else last + timedelta(seconds=behind_s),
    )


class RecentPartsMissed:
    """The parts missed per station in the last `window`; safe to call from any thread."""

    def __init__(self, store: FleetStore, window: timedelta = WINDOW) -> None:
        self._store = store
        self._window = window
        self._lock = threading.Lock()
        self._tallies: dict[str, _StationTally] = {}

    def __call__(
        self, now: datetime, behind_s: Mapping[str, float | None]
    ) -> dict[str, PartsMissed | None]:
        """station -> its figure; `behind_s`: how far each station's clock is behind the
        controller's (its reports are stamped with it), None or absent when not known."""
        with self._lock:
            seen = {station: tally.count for station, tally in self._tallies.items()}
            for station, new in self._store.parts_missed_reports(seen).items():
                tally = self._tallies.get(station)
                if tally is None or new.whole:
                    tally = self._tallies[station] = _StationTally()
                tally.count = new.count
                for ts, parts in new.reports:
                    if parts is None:
                        continue
                    if tally.latest_reported is None or ts > tally.latest_reported:
                        tally.latest_reported = ts
                    if parts > 0:
                        tally.missed.append((ts, parts))
            figures: dict[str, PartsMissed | None] = {}
            for station, tally in self._tallies.items():
                since = now - self._window - timedelta(seconds=behind_s.get(station) or 0.0)
                tally.missed = [entry for entry in tally.missed if entry[0] >= since]
                figures[station] = summarise(tally, since, behind_s.get(station) or 0.0)
            return figures
