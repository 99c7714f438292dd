"""The stage's evidence (asked every controller tick) and the dashboard's series (every
refresh of every open dashboard) once a few more parts came in: the work must not grow with the
rows their window holds. Counted in SQLite VM steps, not timed; bench/fleet_store_scale.py times
them on a fleet.db of plant size."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deploy.fleet_store import SqliteFleetStore
from linesight import protocol as p

T0 = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="1.1.0", sha256="c" * 64)
MESSAGE_TABLES = ("messages", "decisions", "shadows", "verdicts", "acks")


def vm_steps(store: SqliteFleetStore, call: Callable[[], object]) -> int:
    """SQLite VM instructions (in hundreds) that `call` ran on this thread's connection."""
    conn = store._conn()
    counted = [0]

    def tick() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 0)
    return counted[0]


def part(station: str, seq: int, at: datetime, disagree: bool) -> list[p.Envelope]:
    part_id = f"{station}-{seq}"
    return [
        p.Decision(
            station=station, seq=seq, ts=at, part_id=part_id, decided_by=p.DecidedBy.ACTIVE,
            label="ok", confidence=0.9, action=p.Action.PASS, model=ACTIVE, latency_ms=3.0,
            automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.SHADOW,
        ),
        p.ShadowResult(
            station=station, seq=seq + 1, ts=at, part_id=part_id, mode=p.DeploymentMode.SHADOW,
            active=p.ModelOpinion(model=ACTIVE, label="ok", latency_ms=3.0),
            candidate=p.ModelOpinion(model=CANDIDATE, label="defect" if disagree else "ok",
                                     latency_ms=3.0 + seq % 97 / 10),
            agree=not disagree,
        ),
    ]


def refresh_cost(tmp_path: Path, parts_in_window: int) -> tuple[int, int]:
    """VM steps of a tick's evidence and a dashboard's series once 20 parts more came in,
    with `parts_in_window` parts in the stage and the plot's window."""
    names = ["a", "b"]
    stage = (names, T0, CANDIDATE.sha256, "defect")
    until = T0 + timedelta(minutes=30)
    with SqliteFleetStore(tmp_path / f"fleet-{parts_in_window}.db") as store:
        spacing = timedelta(minutes=20) / parts_in_window
        messages: list[p.Envelope] = []
        for index in range(parts_in_window):
            messages += part(names[index % 2], 2 * index, T0 + index * spacing, index % 40 == 0)
        store.ingest(messages, received=T0)
        store.paired_evidence(*stage)
        store.evidence_series(names, T0, 30, until=until)
        more: list[p.Envelope] = []
        for index in range(parts_in_window, parts_in_window + 20):
            more += part(names[index % 2], 2 * index, T0 + timedelta(minutes=25), index % 40 == 0)
        store.ingest(more, received=T0 + timedelta(minutes=25))
        evidence_steps = vm_steps(store, lambda: store.paired_evidence(*stage))
        series_steps = vm_steps(store, lambda: store.evidence_series(names, T0, 30, until=until))
    return evidence_steps, series_steps


def test_refreshing_the_evidence_and_the_series_costs_the_same_in_a_fuller_window(
    tmp_path: Path,
) -> None:
    """Each tick asks for the stage's evidence and each dashboard refresh for the series:
    eight times the rows in their window must not make that eight times the work (it was a
    read of every row of the window, over a second per tick at a plant's rate)."""
    evidence_small, series_small = refresh_cost(tmp_path, 500)
    evidence_large, series_large = refresh_cost(tmp_path, 4000)
    assert evidence_large < 1.5 * evidence_small + 20, (evidence_small, evidence_large)
    assert series_large < 1.5 * series_small + 20, (series_small, series_large)


def test_bringing_the_totals_up_to_date_reads_no_whole_table(tmp_path: Path) -> None:
    """What a tick and a refresh run once their totals exist: searches, never a scan."""
    names = ["a", "b"]
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest(part("a", 0, T0, True), received=T0)
        store.paired_evidence(names, T0, CANDIDATE.sha256)
        store.evidence_series(names, T0 + timedelta(seconds=1), 30, CANDIDATE.sha256,
                              until=T0 + timedelta(minutes=30))
        store.ingest(part("a", 2, T0, True), received=T0)
        conn = store._conn()
        seen: list[str] = []
        conn.set_trace_callback(seen.append)
        try:
            store.paired_evidence(names, T0, CANDIDATE.sha256)
            store.evidence_series(names, T0 + timedelta(seconds=1), 30, CANDIDATE.sha256,
                                  until=T0 + timedelta(minutes=30))
        finally:
            conn.set_trace_callback(None)
        queries = [sql for sql in seen if sql.lstrip().upper().startswith(("SELECT", "WITH"))]
        assert len(queries) >= 5
        for sql in queries:
            assert scans(conn, sql) == [], sql


def scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    steps = [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    return [step for step in steps
            if step.startswith("SCAN ") and step.split()[1] in MESSAGE_TABLES]
