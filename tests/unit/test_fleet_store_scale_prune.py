"""The retention prune at plant scale: an hour of a plant's messages is a million rows, pruned
in short batches; between two batches the ingest (and every other writer) gets the write lock,
and no batch re-reads the old rows that must stay (above a gap in their stream)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deploy.fleet_store import SqliteFleetStore
from linesight import protocol as p

ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
OLD = datetime.now(UTC) - timedelta(days=40)
CUTOFF = datetime.now(UTC) - timedelta(days=30)


def decision(station: str, seq: int, at: datetime = OLD) -> p.Decision:
    return p.Decision(
        station=station, seq=seq, ts=at, part_id=f"{station}-{seq}",
        decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
        model=ACTIVE, latency_ms=3.0, automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.SHADOW,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFleetStore]:
    with SqliteFleetStore(tmp_path / "fleet.db") as opened:
        yield opened


def test_a_writer_waiting_during_a_prune_batch_goes_before_the_next_batch(
    store: SqliteFleetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hourly prune of a plant deletes a million rows in some two hundred batches, back to
    back: an ingest batch that waits for the write lock meanwhile must get it between two of
    them, not after the last (its busy timeout would run out, and every station's receipts
    wait)."""
    store.ingest([decision("press-01", seq) for seq in range(3000)], received=OLD)
    events: list[tuple[str, str]] = []
    ingest_asked = threading.Event()
    original = store._db.write

    @contextlib.contextmanager
    def logged(**kwargs: Any) -> Iterator[sqlite3.Connection]:
        who = threading.current_thread().name
        if who == "ingest":
            ingest_asked.set()
        with original(**kwargs) as conn:
            events.append((who, "begin"))
            if who == "pruner" and not ingest.is_alive() and not ingest_asked.is_set():
                ingest.start()  # asks for the write lock while the first batch holds it
                assert ingest_asked.wait(30)
                time.sleep(0.05)  # into SQLite's wait for the lock
            yield conn
        events.append((who, "commit"))

    monkeypatch.setattr(store._db, "write", logged)
    ingest = threading.Thread(
        target=lambda: store.ingest([decision("press-02", 0, datetime.now(UTC))]), name="ingest"
    )
    pruned: list[int] = []
    pruner = threading.Thread(target=lambda: pruned.append(store.prune(CUTOFF, batch=100)),
                              name="pruner")
    pruner.start()
    pruner.join(60)
    ingest.join(60)
    assert pruned == [3000]
    prune_begins = [i for i, event in enumerate(events) if event == ("pruner", "begin")]
    ingest_begin = events.index(("ingest", "begin"))
    assert ingest_begin < prune_begins[1], (
        f"the ingest got the write lock after prune batch "
        f"{sum(i < ingest_begin for i in prune_begins)} of {len(prune_begins)}")


def vm_steps(store: SqliteFleetStore, call: Callable[[], object]) -> int:
    """Thousands of SQLite VM instructions `call` ran on this thread's connection."""
    counted = [0]

    def tick() -> int:
        counted[0] += 1
        return 0

    conn = store._conn()
    conn.set_progress_handler(tick, 1000)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 0)
    return counted[0]


def old_rows_above_a_gap(store: SqliteFleetStore, stuck: int, prunable: int) -> None:
    """`stuck` old messages of a station whose seq 0 never came (not receipted: they stay),
    and `prunable` old receipted ones of another station."""
    store.ingest([decision("press-01", seq) for seq in range(1, stuck + 1)], received=OLD)
    store.ingest([decision("press-02", seq) for seq in range(prunable)], received=OLD)


def test_each_prune_batch_reads_on_from_the_last_not_again_over_the_rows_that_stay(
    tmp_path: Path,
) -> None:
    """Old rows that must stay (above a gap in their stream) were read again by every batch
    from the start: a prune in many batches cost their number times the batches."""
    steps = {}
    for batches in (1, 20):
        with SqliteFleetStore(tmp_path / f"{batches}.db") as store:
            old_rows_above_a_gap(store, stuck=4000, prunable=2000)
            size = 2000 // batches
            steps[batches] = vm_steps(store, lambda: store.prune(CUTOFF, batch=size))  # noqa: B023
            assert store.contiguous("press-01") == -1
            remaining = store._conn().execute("SELECT count(*) FROM messages").fetchone()[0]
            assert remaining == 4000  # every stuck row kept, every receipted one pruned
    assert steps[20] < 2 * steps[1], steps
