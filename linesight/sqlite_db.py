"""One SQLite file shared by several threads (and processes): the way both stores use it.

Every thread gets its own connection, so a reader never waits behind another thread's writes;
every write is one short `BEGIN IMMEDIATE` transaction; the schema is migrated by
`PRAGMA user_version`. The station's store and the controller's fleet store differ only in
their default durability (`synchronous`) and extra pragmas.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]
Transaction = contextlib.AbstractContextManager[sqlite3.Connection]


class DatabaseError(Exception):
    """The database cannot be used as asked (closed, WAL refused, a newer schema)."""


class SqliteDatabase:
    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous,
        busy_timeout_s: float,
        pragmas: Sequence[str] = (),
        error: type[Exception] = DatabaseError,
    ) -> None:
        if busy_timeout_s <= 0:
            raise ValueError(f"busy_timeout_s: must be positive, got {busy_timeout_s}")
        self.path = path
        self.synchronous: Synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._pragmas = tuple(pragmas)
        self._error = error
        self._local = threading.local()
        self._registry_lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._registry_lock:
            if self._closed:
                raise self._error(f"{self.path} is closed")
            # isolation_level=None: transactions are ours to begin, so every write can be
            # IMMEDIATE; check_same_thread=False only so close() may close it from any thread.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise self._error(f"{self.path}: WAL journal refused (got {mode!r})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
                for pragma in self._pragmas:
                    conn.execute(f"PRAGMA {pragma}")
            except BaseException:
                conn.close()
                raise
            # A server that starts a thread per request would otherwise pile up connections.
            live = []
            for thread, other in self._connections:
                if thread.is_alive():
                    live.append((thread, other))
                else:
                    other.close()
            live.append((threading.current_thread(), conn))
            self._connections = live
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def write(self, *, synchronous: Synchronous | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction; `synchronous` overrides the durability for this one only."""
        conn = self.connection()
        override = synchronous is not None and synchronous != self.synchronous
        if override:
            conn.execute(f"PRAGMA synchronous={synchronous}")
        try:
            # IMMEDIATE takes the write lock up front: a deferred read-then-write could fail
            # with SQLITE_BUSY on upgrade, which busy_timeout does not retry.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) can leave the transaction open; end it here so
                # this thread's next write does not fail on a nested BEGIN.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if override:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so several queries see one consistent state."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def migrate(self, migrations: Sequence[Sequence[str]]) -> None:
        """Bring the schema to version len(migrations); refuse a newer one. BEGIN IMMEDIATE
        serialises two processes opening a fresh file at once."""
        latest = len(migrations)
        with self.write(synchronous="FULL") as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > latest:
                raise self._error(
                    f"{self.path} has schema {version}; this build knows up to {latest}"
                )
            for statements in migrations[version:]:
                for statement in statements:
                    conn.execute(statement)
            if version != latest:
                conn.execute(f"PRAGMA user_version={latest}")

    def schema_version(self) -> int:
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._registry_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for _, conn in connections:
            conn.close()
        self._local = threading.local()
