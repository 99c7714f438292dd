"""`linesight fleet backup`: a consistent copy of the controller's fleet.db, taken while it runs.

The fleet store holds what no station keeps a copy of once it was receipted (decisions, verdicts,
rollout state), so it is worth a copy every night. SQLite's online backup copies the database as
of one moment in a single read transaction; in WAL mode the controller goes on storing and
receipting meanwhile (its WAL grows until the copy is done). The copy is checked, made a plain
single file (rollback journal, no -wal beside it), synced and only then given its name: a copy
cut short never looks like a backup.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from linesight.fsync import fsync_path

FLEET_DB = "fleet.db"
_BACKUP_NAME = re.compile(r"fleet-\d{8}-\d{6}\.db")


class BackupError(Exception):
    """The backup could not be made; the message says why. Nothing was left half written."""


@dataclass(frozen=True, slots=True)
class Backup:
    path: Path
    size_bytes: int
    seconds: float
    schema_version: int
    removed: tuple[Path, ...] = ()
    """Older backups deleted to keep `keep` of them."""


def backup_name(now: datetime) -> str:
    return f"fleet-{now:%Y%m%d-%H%M%S}.db"


def back_up(data_dir: Path, dest: Path, now: datetime, keep: int | None = None) -> Backup:
    """Copy `data_dir`/fleet.db to `dest`: a file that must not exist yet, or a folder, where
    the copy is named fleet-YYYYmmdd-HHMMSS.db and, with `keep`, only the newest `keep` such
    copies stay (with `keep`, `dest` is a folder, made when missing)."""
    if keep is not None and keep < 1:
        raise BackupError(f"--keep: keep at least 1 backup, got {keep}")
    source = data_dir / FLEET_DB
    if not source.is_file():
        raise BackupError(f"{source}: no fleet store there (give the controller's data_dir)")
    if keep is not None and not dest.exists():
        if not dest.parent.is_dir():
            # a share not mounted, a mistyped path: not for a backup to make up
            raise BackupError(f"{dest.parent}: no such folder: make it first (--keep makes "
                              "only the last folder)")
        # --keep names a folder: the first backup by hand (before the timer's) makes it.
        dest.mkdir(mode=0o750)
    folder = dest.is_dir()
    if keep is not None and not folder:
        raise BackupError(f"--keep: {dest} is not a folder; --keep counts the backups in one")
    target = dest / backup_name(now) if folder else dest
    if target.exists():
        raise BackupError(f"{target} exists already: give another name, or a folder")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent}: no such folder")
    partial = target.with_name(target.name + ".part")
    for stale in (partial, partial.with_name(partial.name + "-journal")):  # a copy cut short
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    started = time.monotonic()
    try:
        version = _copy(source, partial)
        fsync_path(partial)
        partial.rename(target)
        fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    removed = _prune(target.parent, keep) if keep is not None else ()
    return Backup(target, target.stat().st_size, time.monotonic() - started, version, removed)


def _copy(source: Path, target: Path) -> int:
    """The online backup of `source` into `target`, checked; its schema version."""
    try:
        with contextlib.closing(sqlite3.connect(source, timeout=30)) as src, \
                contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)  # all pages in one step: one consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the copy of {source} fails SQLite's quick_check: {check}")
            version = int(dst.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {source}: {exc}") from exc
    except OSError as exc:
        raise BackupError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if "rollouts" not in tables or "stations" not in tables:
        raise BackupError(f"{source} is not a Linesight fleet store (no rollouts or stations "
                          "table)")
    return version


def _prune(folder: Path, keep: int) -> tuple[Path, ...]:
    """Delete all but the newest `keep` backups in `folder` (by the time in their names; other
    files are never touched)."""
    backups = sorted(path for path in folder.iterdir()
                     if _BACKUP_NAME.fullmatch(path.name) and path.is_file())
    old = backups[:-keep]
    for path in old:
        path.unlink()
    return tuple(old)
