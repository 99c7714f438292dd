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

from deploy.fleet_store import SqliteFleetStore
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
}


@pytest.mark.parametrize("name", sorted(POLLED))
def test_a_polled_query_reads_an_index_range_never_a_whole_message_table(
    store: SqliteFleetStore, name: str
) -> None:
    statements = statements_run(store, lambda: POLLED[name](store))
    assert statements, f"{name}: no query captured"
    for sql in statements:
        assert table_scans(store._conn(), sql) == [], f"{name} scans a table: {sql}"
