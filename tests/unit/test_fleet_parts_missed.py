"""The parts each station missed in the last hour, as the inventory shows them: kept up to date
from the reports stored since the last look, by the controller's clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from deploy.fleet_store import SqliteFleetStore
from deploy.parts_missed import PartsMissed, RecentPartsMissed
from linesight import protocol as p

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def report(station: str, at: datetime, missed: int | None) -> p.StationMetrics:
    return p.StationMetrics(station=station, seq=0, ts=at, window_s=10.0, parts=50,
                            parts_missed=missed)


def test_new_reports_add_up_and_old_ones_leave_the_hour(tmp_path: Path) -> None:
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        recent = RecentPartsMissed(store)
        store.ingest([report("st-1", NOW - timedelta(minutes=50), 4)])
        assert recent(NOW, {}) == {"st-1": PartsMissed(4, NOW - timedelta(minutes=50))}
        store.ingest([report("st-1", NOW + timedelta(minutes=5), 0)])
        assert recent(NOW + timedelta(minutes=5), {})["st-1"] == PartsMissed(
            4, NOW - timedelta(minutes=50))
        # 11 minutes on, the report that missed 4 is more than an hour old.
        store.ingest([report("st-1", NOW + timedelta(minutes=11), 2)])
        assert recent(NOW + timedelta(minutes=11), {})["st-1"] == PartsMissed(
            2, NOW + timedelta(minutes=11))
        # No report at all for an hour: nothing is known of the hour.
        assert recent(NOW + timedelta(minutes=75), {})["st-1"] is None


def test_a_station_whose_reports_do_not_say_is_unknown_not_zero(tmp_path: Path) -> None:
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([report("synthetic", NOW - timedelta(minutes=1), None),
                      report("clean", NOW - timedelta(minutes=1), 0)])
        assert RecentPartsMissed(store)(NOW, {}) == {"synthetic": None,
                                                     "clean": PartsMissed(0, None)}


def test_a_station_clock_hours_behind_still_counts_by_the_controllers_clock(
    tmp_path: Path,
) -> None:
    """Its reports are stamped 3 h ago by its clock; the controller measured the offset."""
    behind_s = 3 * 3600.0
    stamped = NOW - timedelta(seconds=behind_s) - timedelta(minutes=2)
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([report("st-late", stamped, 6)])
        figures = RecentPartsMissed(store)(NOW, {"st-late": behind_s})
    assert figures == {"st-late": PartsMissed(6, NOW - timedelta(minutes=2))}
