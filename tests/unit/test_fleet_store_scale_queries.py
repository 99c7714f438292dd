"""The fleet store at plant scale: what the dashboard and the API ask must not grow with the
tables. Each query the store runs for them is captured as SQLite runs it and its plan checked:
a search of an index range, never a scan of a table of station messages (which hold millions of
rows at a plant's rate over the retention). bench/fleet_store_scale.py times them on a fleet.db
of plant size."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.fleet_store import METRICS_HISTORY, SqliteFleetStore
from linesight import protocol as p

ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64)
MESSAGE_TABLES = ("messages", "decisions", "shadows", "verdicts", "acks")
NOW = datetime.now(UTC)


def part(station: str, seq: int, at: datetime) -> list[p.Envelope]:
    part_id = f"{station}-{seq}"
    opinion = p.ModelOpinion(model=ACTIVE, label="ok", confidence=0.9, latency_ms=3.0)
    return [
        p.Decision(
            station=station, seq=seq, ts=at, part_id=part_id, decided_by=p.DecidedBy.ACTIVE,
            label="ok", confidence=0.9, action=p.Action.PASS, model=ACTIVE, latency_ms=3.0,
            automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.SHADOW,
        ),
        p.ShadowResult(
            station=station, seq=seq + 1, ts=at, part_id=part_id, mode=p.DeploymentMode.SHADOW,
            active=opinion, candidate=opinion.model_copy(update={"model": CANDIDATE}),
            agree=True,
        ),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFleetStore]:
    """Three stations, two hours of parts, a rollout and an ack; no ANALYZE statistics (the
    controller never gathers them), so the planner goes by the schema alone."""
    with SqliteFleetStore(tmp_path / "fleet.db") as opened:
        messages: list[p.Envelope] = []
        for station in ("press-01", "press-02", "press-03"):
            for index in range(200):
                messages += part(station, 2 * index, NOW - timedelta(minutes=120 - index * 0.6))
        opened.ingest(messages, received=NOW - timedelta(hours=2))
        opened.save_rollout("r-1", "promoted", "{}", NOW)
        yield opened


def statements_run(store: SqliteFleetStore, call: Callable[[], object]) -> list[str]:
    """The statements `call` ran on this thread's connection, with their parameters bound."""
    conn = store._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    return [sql for sql in seen if sql.lstrip().upper().startswith(("SELECT", "WITH"))]


def table_scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The plan's steps that read a whole table of station messages, or one of its indexes."""
    steps = [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    return [step for step in steps
            if step.startswith("SCAN ") and step.split()[1] in MESSAGE_TABLES]


POLLED: dict[str, Callable[[SqliteFleetStore], object]] = {
    "stations": lambda s: s.stations(),
    "series": lambda s: s.evidence_series(["press-01", "press-02"],
                                          NOW - timedelta(minutes=30), 30),
    "series of a candidate": lambda s: s.evidence_series(
        ["press-01"], NOW - timedelta(minutes=30), 30, candidate_sha256=CANDIDATE.sha256),
    "rollouts": lambda s: s.rollouts(),
    "rollout": lambda s: s.rollout("r-1"),
    "latest rollout": lambda s: s.latest_rollout(),
    "active rollout": lambda s: s.active_rollout(),
    "decisions of a station": lambda s: s.decisions("press-01", NOW - timedelta(minutes=5)),
    "decisions": lambda s: s.decisions(since=NOW - timedelta(minutes=5), limit=100),
    "decision counts": lambda s: s.decision_counts(NOW - timedelta(minutes=5)),
    "ack": lambda s: s.ack(str(uuid.uuid4())),
    "metrics history": lambda s: s.metrics_history("press-01"),
    "parts missed": lambda s: s.parts_missed_reports({}),
}


@pytest.mark.parametrize("name", sorted(POLLED))
def test_a_polled_query_reads_an_index_range_never_a_whole_message_table(
    store: SqliteFleetStore, name: str
) -> None:
    statements = statements_run(store, lambda: POLLED[name](store))
    assert statements, f"{name}: no query captured"
    for sql in statements:
        assert table_scans(store._conn(), sql) == [], f"{name} scans a table: {sql}"


def metrics(station: str, number: int) -> p.StationMetrics:
    """The station's report `number` (its first is 1), which missed `number` parts."""
    return p.StationMetrics(station=station, seq=number, ts=NOW - timedelta(seconds=900 - number),
                            window_s=1.0, parts=10, parts_missed=number)


def test_the_parts_missed_read_only_the_slots_of_reports_not_read_yet(tmp_path: Path) -> None:
    """The dashboard asks every 2 s: each station's new reports are an index range of its ring
    (usually one row), never the whole metrics_history."""
    stations = [f"press-{n:02d}" for n in range(1, 6)]
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([metrics(station, n) for station in stations for n in range(1, 6)])
        first = store.parts_missed_reports({})
        assert {s: (r.count, r.whole, len(r.reports)) for s, r in first.items()} == {
            station: (5, True, 5) for station in stations}
        store.ingest([metrics("press-03", 6)])
        seen = {station: 5 for station in stations}
        statements = statements_run(store, lambda: store.parts_missed_reports(seen))
        later = store.parts_missed_reports(seen)
    assert {s: (r.count, r.whole, [m for _, m in r.reports]) for s, r in later.items()} == {
        "press-03": (6, False, [6])}
    history = [sql for sql in statements if "metrics_history" in sql]
    assert len(history) == 1, statements
    with SqliteFleetStore(tmp_path / "fleet.db") as reopened:
        steps = [str(row[3]) for row in reopened._conn().execute(
            "EXPLAIN QUERY PLAN " + history[0])]
    assert steps == ["SEARCH metrics_history USING PRIMARY KEY (station=? AND slot>? AND slot<?)"]


def test_the_parts_missed_follow_the_ring_round_its_end(tmp_path: Path) -> None:
    """Reports 719 to 725 sit in the ring's last two slots and its first five."""
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([metrics("press-01", n) for n in range(1, METRICS_HISTORY + 6)])
        found = store.parts_missed_reports({"press-01": METRICS_HISTORY - 2})["press-01"]
        assert (found.count, found.whole) == (METRICS_HISTORY + 5, False)
        assert sorted(m for _, m in found.reports if m is not None) == list(
            range(METRICS_HISTORY - 1, METRICS_HISTORY + 6))
        # More new reports than the ring holds: all it holds, the oldest overwritten.
        behind = store.parts_missed_reports({"press-01": 3})["press-01"]
        assert behind.whole and len(behind.reports) == METRICS_HISTORY
        assert min(m for _, m in behind.reports if m is not None) == 6
