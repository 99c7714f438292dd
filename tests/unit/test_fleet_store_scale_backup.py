"""A backup at plant scale: `linesight fleet backup` reads fleet.db in one transaction for as long
as the copy takes (minutes for a plant's file), while the controller goes on storing. The WAL
cannot be checkpointed past that reader, so it grows by all that was stored meanwhile; once the
copy is done it must shrink back, not keep that size on the disk for good."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from deploy.fleet_store import SqliteFleetStore
from linesight import protocol as p

ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
MB = 2**20


def decisions(first: int, count: int) -> list[p.Envelope]:
    return [
        p.Decision(
            station="press-01", seq=seq, ts=datetime.now(UTC), part_id=f"part-{seq}",
            decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
            model=ACTIVE, latency_ms=3.0, automation=p.AutomationLevel.FULL,
            mode=p.DeploymentMode.SHADOW,
        )
        for seq in range(first, first + count)
    ]


def test_the_wal_a_long_backup_made_grow_shrinks_back_once_it_is_done(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    wal = tmp_path / "fleet.db-wal"
    with SqliteFleetStore(path) as store:
        store.ingest(decisions(0, 1))
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as backup:
            backup.execute("BEGIN")  # the backup's read transaction, held while it copies
            backup.execute("SELECT count(*) FROM messages").fetchone()
            seq = 1
            while wal.stat().st_size < 40 * MB:  # stored while the copy goes on
                store.ingest(decisions(seq, 1000))
                seq += 1000
            backup.execute("COMMIT")
        for _ in range(30):  # the controller goes on: checkpoints catch up, the WAL restarts
            store.ingest(decisions(seq, 1000))
            seq += 1000
        assert wal.stat().st_size <= 32 * MB, f"the WAL stays {wal.stat().st_size / MB:.0f} MB"
