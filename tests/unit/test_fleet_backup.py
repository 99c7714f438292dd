"""`linesight fleet backup`: a consistent copy of a fleet store that is being written, which a
controller opens as it was; named, pruned and refused the way the docs say. Real SQLite files."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.backup import BackupError, back_up
from deploy.fleet_store import SCHEMA_VERSION, SqliteFleetStore, StreamKey
from linesight import protocol as p
from linesight.cli import main

NOW = datetime(2026, 11, 27, 2, 30, 0, tzinfo=UTC)
MODEL = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)


def decision(station: str, seq: int) -> p.Decision:
    return p.Decision(
        station=station, seq=seq, ts=NOW, msg_id=uuid.uuid4(), part_id=f"{station}-{seq}",
        decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
        model=MODEL, latency_ms=3.0, automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.NONE,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A controller's data_dir whose store holds 100 decisions and a rollout."""
    folder = tmp_path / "fleet"
    folder.mkdir()
    with SqliteFleetStore(folder / "fleet.db") as store:
        store.ingest([decision("st-1", seq) for seq in range(100)])
        store.save_rollout("r-1", "promoted", '{"rollout_id": "r-1"}', NOW)
    yield folder


def test_a_store_being_written_is_copied_as_of_one_moment(data_dir: Path, tmp_path: Path) -> None:
    """The controller keeps ingesting during the copy; the copy is whole and opens as a store."""
    stop = threading.Event()
    written: list[int] = []

    def ingest() -> None:
        with SqliteFleetStore(data_dir / "fleet.db") as store:
            seq = 100
            while not stop.is_set():
                store.ingest([decision("st-1", seq)])
                written.append(seq)
                seq += 1

    writer = threading.Thread(target=ingest)
    writer.start()
    try:
        while len(written) < 20:  # the writer is busy before the copy starts
            stop.wait(0.01)
        done = back_up(data_dir, tmp_path / "copy.db", NOW)
        during = len(written)
        while len(written) < during + 20:  # and still writes after it
            stop.wait(0.01)
    finally:
        stop.set()
        writer.join(10)
    assert done.path == tmp_path / "copy.db" and done.schema_version == SCHEMA_VERSION
    assert done.size_bytes == done.path.stat().st_size > 0
    assert not (tmp_path / "copy.db-wal").exists(), "one self-contained file"
    with SqliteFleetStore(done.path) as copy:
        copied = copy.decisions("st-1")
        assert copy.rollout("r-1") == '{"rollout_id": "r-1"}'
        contiguous = copy.contiguous("st-1")
    # A snapshot: every decision up to some seq, none missing below it.
    assert sorted(d.seq for d in copied) == list(range(len(copied)))
    assert contiguous == len(copied) - 1
    assert 120 <= len(copied) <= 100 + during + 1
    with SqliteFleetStore(data_dir / "fleet.db") as original:
        assert len(original.decisions("st-1")) == 100 + len(written) > len(copied)


def test_a_restored_copy_is_what_the_controller_continues_from(
    data_dir: Path, tmp_path: Path
) -> None:
    done = back_up(data_dir, tmp_path, NOW)
    restored = tmp_path / "restored"
    restored.mkdir()
    done.path.rename(restored / "fleet.db")
    with SqliteFleetStore(restored / "fleet.db") as store:
        assert store.contiguous("st-1") == 99
        assert store.ingest([decision("st-1", 100)]) == {StreamKey("st-1"): 100}


def test_a_copy_cut_short_earlier_is_replaced(data_dir: Path, tmp_path: Path) -> None:
    """A backup killed mid-copy (a power cut) left its .part file and journal behind."""
    (tmp_path / "copy.db.part").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    (tmp_path / "copy.db.part-journal").write_bytes(b"\x00" * 512)
    done = back_up(data_dir, tmp_path / "copy.db", NOW)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]
    with SqliteFleetStore(done.path) as copy:
        assert copy.contiguous("st-1") == 99


def test_a_folder_gets_dated_copies_and_keeps_the_newest(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "fleet-notes.db").write_text("not a backup of ours")
    made = [back_up(data_dir, folder, NOW + timedelta(days=day), keep=2) for day in range(4)]
    assert [m.path.name for m in made] == [
        "fleet-20261127-023000.db", "fleet-20261128-023000.db", "fleet-20261129-023000.db",
        "fleet-20261130-023000.db"]
    assert [m.removed for m in made] == [(), (), (made[0].path,), (made[1].path,)]
    assert sorted(p.name for p in folder.iterdir()) == [
        "fleet-20261129-023000.db", "fleet-20261130-023000.db", "fleet-notes.db"]


def test_keep_makes_its_folder_the_first_time(data_dir: Path, tmp_path: Path) -> None:
    """The documented command run by hand before the nightly timer ever made the folder."""
    folder = tmp_path / "linesight-backups"
    made = back_up(data_dir, folder, NOW, keep=14)
    assert made.path == folder / "fleet-20261127-023000.db"
    assert folder.is_dir() and made.path.is_file()


@pytest.mark.parametrize(("case", "said"), [
    ("no_store", "no fleet store there (give the controller's data_dir)"),
    ("exists", "exists already: give another name, or a folder"),
    ("no_folder", "no such folder"),
    ("keep_file", "--keep: "),
    ("keep_no_parent", "no such folder: make it first (--keep makes only the last folder)"),
    ("keep_zero", "--keep: keep at least 1 backup, got 0"),
    ("foreign", "is not a Linesight fleet store"),
])
def test_what_cannot_be_backed_up_is_refused_and_leaves_nothing(
    data_dir: Path, tmp_path: Path, case: str, said: str
) -> None:
    source, dest, keep = data_dir, tmp_path / "copy.db", None
    if case == "no_store":
        source = tmp_path / "elsewhere"
    elif case == "exists":
        dest.write_text("an earlier copy")
    elif case == "no_folder":
        dest = tmp_path / "missing" / "copy.db"
    elif case == "keep_file":
        dest.write_text("a file where the folder should be")
        keep = 3
    elif case == "keep_no_parent":
        dest, keep = tmp_path / "share" / "linesight", 14
    elif case == "keep_zero":
        dest, keep = tmp_path, 0
    elif case == "foreign":
        source = tmp_path / "other"
        source.mkdir()
        with sqlite3.connect(source / "fleet.db") as conn:
            conn.execute("CREATE TABLE notes (text)")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(BackupError, match=said.replace("(", r"\(").replace(")", r"\)")):
        back_up(source, dest, NOW, keep)
    assert sorted(tmp_path.rglob("*")) == before, "no copy, and no part of one, is left"


def test_the_command_says_where_the_copy_went(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    assert main(["fleet", "backup", str(folder), "--data-dir", str(data_dir), "--keep", "7"]) == 0
    out = capsys.readouterr().out
    copy = next(folder.iterdir())
    assert out.startswith(f"backed up {data_dir / 'fleet.db'} to {copy} (")
    assert f"schema {SCHEMA_VERSION}" in out
    assert main(["fleet", "backup", str(copy), "--data-dir", str(data_dir)]) == 2
    assert f"linesight fleet: error: {copy} exists already" in capsys.readouterr().err
