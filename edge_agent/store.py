"""The station's local store: one SQLite file in WAL mode beside a folder of review images.

Two processes share it: the agent (inspection, outbox, receipts, commands) and the station UI
(review queue, verdicts, operators, requests to the agent). The UI may import only this module
of the agent, so everything the two exchange goes through here.

The outbox is the reason this module exists: a message the agent must deliver is given its
station `seq` and the store's seq `stream` and written to disk in one transaction, and leaves
only when the controller's Receipt for that stream covers it. See docs/decisions/0003-outbox.md
for the durability and bound policies, 0009-seq-streams.md for the stream.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

from linesight.fsync import fsync_path
from linesight.protocol import (
    CHANNEL_OF,
    DELIVERY,
    PART_ID_MAX_LENGTH,
    Action,
    AutomationLevel,
    Channel,
    DecidedBy,
    Envelope,
    ReviewReason,
    VerdictOutcome,
)
from linesight.sqlite_db import SqliteDatabase, Transaction

log = logging.getLogger(__name__)

MessageT = TypeVar("MessageT", bound=Envelope)
DB_FILE = "station.db"
IMAGES_DIR = "images"
DEFAULT_MAX_OUTBOX_ROWS = 100_000
DEFAULT_BUSY_TIMEOUT_S = 5.0
OPERATOR_ROLES = ("operator", "supervisor")
# An acknowledge after a long outage deletes in slices so enqueue on the critical path can
# slip in between them instead of waiting for one long delete.
_ACK_SLICE_ROWS = 2_000
# An unreferenced image younger than this (by its mtime and the wall clock) may belong to
# another process's add_reviews; this store's own are known by name (`_ImagesInFlight`).
_ORPHAN_GRACE_S = 600.0
_IMAGE_SUFFIX = ".jpg"
_TEMP_SUFFIX = ".tmp"
_TEMP_NAMES = itertools.count()  # shared by every store of the process: names never repeat
_MAX_PART_ID = PART_ID_MAX_LENGTH
_MAX_LABEL = 64
_MAX_OPERATOR = 64
MAX_UI_SESSIONS = 1000
"""At most this many live UI sign-ins; past it, a sign-in ends the oldest one."""
MAX_OPEN_REQUESTS = 20
"""At most this many requests from the screen wait for the station; past it, one is refused."""

_SCHEMA_V1: tuple[str, ...] = (
    # One row: the seq counter and the counters kept beside it in the same transaction.
    """CREATE TABLE outbox_meta (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        next_seq INTEGER NOT NULL CHECK (next_seq >= 0),
        outbox_rows INTEGER NOT NULL CHECK (outbox_rows >= 0),
        shadow_dropped INTEGER NOT NULL CHECK (shadow_dropped >= 0)
    )""",
    "INSERT INTO outbox_meta (id, next_seq, outbox_rows, shadow_dropped) VALUES (0, 0, 0, 0)",
    """CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        msg_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
        created_us INTEGER NOT NULL
    )""",
    """CREATE TABLE reviews (
        part_id TEXT PRIMARY KEY,
        created_us INTEGER NOT NULL,
        reason TEXT NOT NULL,
        automation TEXT NOT NULL,
        suggestion TEXT,
        confidence REAL,
        model_label TEXT,
        candidate_label TEXT,
        active_version TEXT NOT NULL,
        candidate_version TEXT,
        image_name TEXT,
        image_bytes INTEGER NOT NULL CHECK (image_bytes >= 0)
    )""",
    "CREATE INDEX reviews_created ON reviews (created_us)",
    # The primary key is what makes a verdict written once, whichever screen taps first.
    """CREATE TABLE verdicts (
        part_id TEXT PRIMARY KEY REFERENCES reviews (part_id) ON DELETE CASCADE,
        operator TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('pass', 'reject', 'escalate')),
        label TEXT,
        decided_at_us INTEGER NOT NULL,
        published_seq INTEGER
    )""",
    "CREATE INDEX verdicts_decided ON verdicts (decided_at_us)",
    "CREATE INDEX verdicts_unpublished ON verdicts (decided_at_us) WHERE published_seq IS NULL",
    """CREATE TABLE commands (
        cmd_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        ack_json TEXT NOT NULL,
        created_us INTEGER NOT NULL
    )""",
    """CREATE TABLE documents (
        name TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        updated_us INTEGER NOT NULL
    )""",
    """CREATE TABLE part_log (
        id INTEGER PRIMARY KEY,
        part_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        action TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        active_label TEXT,
        candidate_label TEXT,
        agree INTEGER,
        active_confidence REAL
    )""",
    "CREATE INDEX part_log_ts ON part_log (ts_us)",
    """CREATE TABLE operators (
        badge TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('operator', 'supervisor')),
        pin_hash TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL
    )""",
    """CREATE TABLE ui_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        level TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        taken_us INTEGER
    )""",
    "CREATE INDEX ui_requests_open ON ui_requests (id) WHERE taken_us IS NULL",
)
# The seq stream's id. A store that has never given out a seq gets a random one, so a station
# whose storage was replaced is told apart from its old self; a store that already numbered
# messages keeps none (NULL), and its messages go on without a stream, as they always did.
_SCHEMA_V2: tuple[str, ...] = (
    "ALTER TABLE outbox_meta ADD COLUMN stream TEXT",
    "UPDATE outbox_meta SET stream = lower(hex(randomblob(16))) WHERE next_seq = 0",
)
# An escalated part ("unsure") waits for a supervisor, whose final pass or reject is kept
# here and published as a second, labelled Verdict for the part; the operator's verdict row
# (outcome escalate, no label) stays as it was written.
_SCHEMA_V3: tuple[str, ...] = (
    """CREATE TABLE resolutions (
        part_id TEXT PRIMARY KEY REFERENCES verdicts (part_id) ON DELETE CASCADE,
        operator TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('pass', 'reject')),
        label TEXT NOT NULL,
        decided_at_us INTEGER NOT NULL,
        published_seq INTEGER
    )""",
    "CREATE INDEX resolutions_unpublished ON resolutions (decided_at_us) "
    "WHERE published_seq IS NULL",
    # A part is confirmed once it has its final verdict: an operator's pass or reject, or a
    # supervisor's resolution of an escalation. Only confirmed parts lose images to the quota.
    """CREATE VIEW confirmed AS
        SELECT v.part_id FROM verdicts v WHERE v.outcome != 'escalate'
        UNION ALL SELECT x.part_id FROM resolutions x""",
    # Published: nothing of the part is still waiting for the outbox.
    """CREATE VIEW unpublished AS
        SELECT part_id FROM verdicts WHERE published_seq IS NULL
        UNION ALL SELECT part_id FROM resolutions WHERE published_seq IS NULL""",
)
# The station UI's live sign-ins (a random id per sign-in, carried by the signed cookie): here
# rather than in each UI process, so a sign-out on one screen is seen by every screen of the
# station at once, and survives their restarts.
_SCHEMA_V4: tuple[str, ...] = (
    "CREATE TABLE ui_sessions (id TEXT PRIMARY KEY, started_us INTEGER NOT NULL)",
    "CREATE INDEX ui_sessions_started ON ui_sessions (started_us)",
)
# Index i holds the statements that take the schema from version i to i + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)
SCHEMA_VERSION = len(_MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used as asked (closed, or written by a newer agent)."""


class TooManyOpenRequests(StoreError):
    """A request from the screen refused: too many wait for the station to make them already."""

    def __init__(self, waiting: int) -> None:
        super().__init__(
            f"{waiting} requests from the screen are still waiting for "
            "the station to make them (is the station agent running? look at its faults); "
            "ask again once it has made them"
        )
        self.waiting = waiting


class OutboxFull(Exception):
    """A SHADOW message was refused because the outbox is at its bound."""

    def __init__(self, depth: int, bound: int) -> None:
        super().__init__(f"outbox holds {depth} rows (bound {bound}); shadow message dropped")
        self.depth = depth
        self.bound = bound


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    msg_id: str
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """A part the operator must judge, with the JPEG the screen shows."""

    part_id: str
    created: datetime
    reason: str
    automation: str
    suggestion: str | None
    confidence: float | None
    model_label: str | None
    candidate_label: str | None
    active_version: str
    candidate_version: str | None
    image_jpeg: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_part_id(self.part_id)
        _check_aware("created", self.created)
        _check_choice("reason", self.reason, ReviewReason)
        _check_choice("automation", self.automation, AutomationLevel)
        _check_probability("confidence", self.confidence)
        for name in ("suggestion", "model_label", "candidate_label"):
            _check_label(name, getattr(self, name))
        if not self.image_jpeg:
            raise ValueError("image_jpeg: an image is required")


@dataclass(frozen=True, slots=True)
class ReviewRow:
    part_id: str
    created: datetime
    reason: str
    automation: str
    suggestion: str | None
    confidence: float | None
    model_label: str | None
    candidate_label: str | None
    active_version: str
    candidate_version: str | None
    image_path: Path | None
    """None once the quota or retention pruned the image (only ever after a verdict)."""
    image_bytes: int
    outcome: str | None
    """The verdict's outcome; None while the part waits for one."""


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """A verdict joined with what the review row knew about the part."""

    part_id: str
    operator: str
    outcome: str
    label: str | None
    decided_at: datetime
    review_reason: str
    model_label: str | None
    candidate_label: str | None
    active_version: str
    candidate_version: str | None
    published_seq: int | None


@dataclass(frozen=True, slots=True)
class Escalation:
    """A part an operator was unsure of, waiting for a supervisor's final verdict."""

    review: ReviewRow
    operator: str
    """Who escalated it."""
    escalated_at: datetime


@dataclass(frozen=True, slots=True)
class QuotaReport:
    bytes_used: int
    """Image bytes on disk after pruning."""
    pruned_confirmed: int
    """Images of verdicted parts deleted by this call."""
    over_quota_unconfirmed: int
    """How many of the oldest unconfirmed images would have to go to get under quota."""
    over_quota_bytes: int
    """How far bytes_used still exceeds the quota; 0 when within it."""
    orphans_removed: int = 0

    @property
    def over_quota(self) -> bool:
        return self.over_quota_bytes > 0


@dataclass(frozen=True, slots=True)
class PartLogEntry:
    part_id: str
    ts: datetime
    action: str
    decided_by: str
    active_label: str | None
    candidate_label: str | None
    agree: bool | None
    active_confidence: float | None

    def __post_init__(self) -> None:
        _check_part_id(self.part_id)
        _check_aware("ts", self.ts)
        _check_choice("action", self.action, Action)
        _check_choice("decided_by", self.decided_by, DecidedBy)
        _check_probability("active_confidence", self.active_confidence)


@dataclass(frozen=True, slots=True)
class PartStats:
    since: datetime
    parts: int
    actions: dict[str, int]
    decided_by: dict[str, int]
    shadow_pairs: int
    """Parts both models judged."""
    agreement_rate: float | None
    verdicts: int
    operator_model_pairs: int
    """Verdicts with a label whose review row carries the active model's label."""
    operator_model_agreement: float | None
    throughput: list[tuple[datetime, int]]
    """Parts per minute, oldest first, zero-filled between the first and last busy minute
    (up to `until`)."""


@dataclass(frozen=True, slots=True)
class OperatorRow:
    badge: str
    name: str
    role: str
    pin_hash: str
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class UiRequest:
    id: int
    kind: str
    level: str
    reason: str
    by: str
    created: datetime


# --- validation and time helpers ------------------------------------------------------------


def _check_part_id(part_id: str) -> None:
    if not isinstance(part_id, str) or not 1 <= len(part_id) <= _MAX_PART_ID:
        raise ValueError(f"part_id: 1 to {_MAX_PART_ID} characters required")


def _check_aware(name: str, value: datetime) -> None:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: a timezone-aware datetime is required")


def _check_choice(name: str, value: str, choices: type[Enum]) -> None:
    if value not in _values_of(choices):
        allowed = [member.value for member in choices]
        raise ValueError(f"{name}: {value!r} is not one of {allowed}")


@functools.lru_cache(maxsize=16)
def _values_of(choices: type[Enum]) -> frozenset[str]:
    return frozenset(member.value for member in choices)


def _check_probability(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be a probability in [0, 1], got {value!r}")


def _check_label(name: str, value: str | None) -> None:
    if value is not None and not 1 <= len(value) <= _MAX_LABEL:
        raise ValueError(f"{name}: 1 to {_MAX_LABEL} characters or None")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit: must be at least 1, got {limit}")


def _check_age(older_than: timedelta) -> None:
    if older_than < timedelta(0):
        raise ValueError(f"older_than: must not be negative, got {older_than}")


def _check_session_id(session_id: str) -> None:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id: a non-empty string is required, got {session_id!r}")


def _check_max_age(max_age: timedelta) -> None:
    if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
        raise ValueError(f"max_age: a positive timedelta is required, got {max_age!r}")


def _span_us(span: timedelta) -> int:
    return span // timedelta(microseconds=1)


def _us(moment: datetime) -> int:
    # Integer microseconds since the epoch: exact round trips and cheap range scans.
    return round(moment.timestamp() * 1_000_000)


def _outbox_message(
    topic: str, qos: int, factory: Callable[[int], MessageT], seq: int, stream: uuid.UUID | None
) -> MessageT:
    """The factory's message for `seq`, checked to be one that goes through the outbox, in
    the store's seq `stream`."""
    if not topic:
        raise ValueError("topic: must not be empty")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos: must be 0, 1 or 2, got {qos!r}")
    message = factory(seq)
    if message.seq != seq:
        raise ValueError(f"factory: built seq {message.seq}, expected {seq}")
    channel = CHANNEL_OF.get(type(message))
    if channel is None or not DELIVERY[channel].durable:
        raise ValueError(f"factory: {type(message).__name__} does not go through the outbox")
    if message.stream != stream:
        if message.stream is not None:
            raise ValueError(f"factory: built stream {message.stream}, expected {stream}")
        # A field of the envelope, not of what the factory decided: no need to validate again.
        message = message.model_copy(update={"stream": stream})
    return message


_INSERT_PART_LOG = (
    "INSERT INTO part_log (part_id, ts_us, action, decided_by, active_label, candidate_label, "
    "agree, active_confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _check_verdict(part_id: str, operator: str, label: str | None, decided_at: datetime) -> None:
    """What every verdict and resolution must carry, whatever its outcome."""
    _check_part_id(part_id)
    if not 1 <= len(operator) <= _MAX_OPERATOR:
        raise ValueError(f"operator: 1 to {_MAX_OPERATOR} characters required")
    _check_label("label", label)
    _check_aware("decided_at", decided_at)


def _part_log_row(entry: PartLogEntry) -> tuple[object, ...]:
    return (
        entry.part_id,
        _us(entry.ts),
        entry.action,
        entry.decided_by,
        entry.active_label,
        entry.candidate_label,
        None if entry.agree is None else int(entry.agree),
        entry.active_confidence,
    )


def _now_us() -> int:
    return time.time_ns() // 1_000


def _dt(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def image_name_for(part_id: str) -> str:
    """The image file name for a part: a digest, so an outside part id never becomes a path."""
    return hashlib.sha256(part_id.encode()).hexdigest() + _IMAGE_SUFFIX


# --- the store -------------------------------------------------------------------------------

_REVIEW_COLUMNS = (  # what `_review_row` reads, in its order
    "r.part_id, r.created_us, r.reason, r.automation, r.suggestion, r.confidence, "
    "r.model_label, r.candidate_label, r.active_version, r.candidate_version, "
    "r.image_name, r.image_bytes, v.outcome"
)
_SELECT_REVIEWS = (
    f"SELECT {_REVIEW_COLUMNS} FROM reviews r LEFT JOIN verdicts v USING (part_id) "  # noqa: S608 - literals
)
_SELECT_RESOLUTIONS = (  # the escalation's verdict `v` is joined for its published_seq
    "SELECT x.part_id, x.operator, x.outcome, x.label, x.decided_at_us, r.reason, "
    "r.model_label, r.candidate_label, r.active_version, r.candidate_version, x.published_seq "
    "FROM resolutions x JOIN reviews r USING (part_id) JOIN verdicts v USING (part_id) "
)
_SELECT_ESCALATIONS = (  # the review row's columns, then who escalated it and when
    f"SELECT {_REVIEW_COLUMNS}, v.operator, v.decided_at_us "  # noqa: S608 - literals
    "FROM reviews r JOIN verdicts v USING (part_id) "
    "WHERE v.outcome = 'escalate' AND r.part_id NOT IN (SELECT part_id FROM confirmed) "
)
_SELECT_VERDICTS = (
    "SELECT v.part_id, v.operator, v.outcome, v.label, v.decided_at_us, r.reason, "
    "r.model_label, r.candidate_label, r.active_version, r.candidate_version, v.published_seq "
    "FROM verdicts v JOIN reviews r USING (part_id) "
)
_STATUS_DOC = "status"
_SLOTS_DOC = "slots"


class _ImagesInFlight:
    """The image file names (temporary and final) this store's `add_reviews` calls are
    writing, renaming or committing, and the sweeps watching them.

    A sweep spares every name that was in flight at any moment while it ran: such a file may
    be named by a row that commits after the sweep read the rows, however old its mtime looks
    (a commit held up by a hung disk, a wall clock stepped forward).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: Counter[str] = Counter()
        self._watches: list[set[str]] = []

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] += 1
            for touched in self._watches:
                touched.add(name)

    def release(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self._names[name] -= 1
                if self._names[name] <= 0:
                    del self._names[name]

    @contextlib.contextmanager
    def watch(self) -> Iterator[set[str]]:
        """The names in flight now, and every one that goes in flight until the block ends."""
        with self._lock:
            touched = set(self._names)
            self._watches.append(touched)
        try:
            yield touched
        finally:
            with self._lock:
                self._watches = [other for other in self._watches if other is not touched]

    def unlink_unless(self, path: Path, touched: set[str]) -> bool:
        """Delete `path` unless its name is in `touched`; whether it was deleted. Under the
        lock, so no `add_reviews` can take the name between the look and the delete."""
        with self._lock:
            if path.name in touched:
                return False
            path.unlink(missing_ok=True)
            return True


class StationStore:
    """The station's SQLite store; safe to share between threads and between processes.

    Every thread gets its own connection, so readers (the network thread listing the outbox,
    the UI) never wait for the writer, and every write is one short `BEGIN IMMEDIATE`
    transaction. Call `close()` once the threads using the store have stopped.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        max_outbox_rows: int = DEFAULT_MAX_OUTBOX_ROWS,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        if max_outbox_rows < 1:
            raise ValueError(f"max_outbox_rows: must be at least 1, got {max_outbox_rows}")
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / IMAGES_DIR
        self.path = self.data_dir / DB_FILE
        self.max_outbox_rows = max_outbox_rows
        self._images_in_flight = _ImagesInFlight()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._db = SqliteDatabase(
            self.path, synchronous="FULL", busy_timeout_s=busy_timeout_s,
            pragmas=("foreign_keys=ON",), error=StoreError,
        )
        self._db.migrate(_MIGRATIONS)
        stream = self._conn().execute("SELECT stream FROM outbox_meta").fetchone()[0]
        self.stream: uuid.UUID | None = None if stream is None else uuid.UUID(hex=stream)
        """This store's seq stream, set on every outbox message; None for a store that was
        numbering messages before streams existed."""

    # -- connections and transactions (linesight.sqlite_db) --

    def _conn(self) -> sqlite3.Connection:
        return self._db.connection()

    def _write(self, *, durable: bool = True) -> Transaction:
        """One short write transaction; `durable=False` skips the fsync for data we can redo:
        under WAL a power cut may lose only that commit, and the next FULL commit makes it
        durable anyway."""
        return self._db.write(synchronous=None if durable else "NORMAL")

    def _snapshot(self) -> Transaction:
        return self._db.snapshot()

    def schema_version(self) -> int:
        return self._db.schema_version()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StationStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- seq counter and outbox --

    def enqueue(self, topic: str, qos: int, factory: Callable[[int], MessageT]) -> MessageT:
        """Give the next seq to `factory`'s message and store it in the outbox, in one commit.

        Raises `OutboxFull` (and counts it) for a SHADOW message when the outbox is at its
        bound; every other durable message is kept. A refused or failed message uses no seq.
        """
        outcome = self.enqueue_many([(topic, qos, factory)])[0]
        # A refusal has committed its drop count; it surfaces here.
        if isinstance(outcome, Exception):
            raise outcome
        return cast(MessageT, outcome)

    def enqueue_many(
        self,
        items: Sequence[tuple[str, int, Callable[[int], Envelope]]],
        part_log: Sequence[PartLogEntry] = (),
    ) -> list[Envelope | Exception]:
        """Several enqueues in ONE commit (one fsync): the agent's group commit.

        Each item gets the message it stored, `OutboxFull`, or the error its factory raised
        (`ValueError`, `TypeError`); a failing or refused item uses no seq, the others are
        kept. The messages are built first, then written with one INSERT for the batch and
        one update of the counters: SQLite statements, not the rows, are what cost here.
        `part_log` entries ride in the same commit (at a line rate a transaction of its own
        cost as much as the messages'); a failure there is logged and costs only them.
        """
        results: list[Envelope | Exception] = []
        with self._write() as conn:
            if part_log:
                self._log_parts_in(conn, part_log)
            next_seq, depth = conn.execute(
                "SELECT next_seq, outbox_rows FROM outbox_meta"
            ).fetchone()
            rows: list[tuple[int, str, str, bytes, int, int]] = []
            refused = 0
            now_us = _now_us()
            for topic, qos, factory in items:
                try:
                    message = _outbox_message(topic, qos, factory, next_seq, self.stream)
                except (ValueError, TypeError) as exc:
                    results.append(exc)
                    continue
                if CHANNEL_OF[type(message)] is Channel.SHADOW and depth >= self.max_outbox_rows:
                    # Counted in the same commit; the seq is not spent, so the controller's
                    # contiguous receipt never waits for a message that will not come.
                    refused += 1
                    results.append(OutboxFull(depth, self.max_outbox_rows))
                    continue
                rows.append(
                    (next_seq, str(message.msg_id), topic, message.to_json(), qos, now_us)
                )
                results.append(message)
                next_seq += 1
                depth += 1
            if rows:
                conn.executemany(
                    "INSERT INTO outbox (seq, msg_id, topic, payload, qos, created_us) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            if rows or refused:
                conn.execute(
                    "UPDATE outbox_meta SET next_seq = ?, outbox_rows = outbox_rows + ?, "
                    "shadow_dropped = shadow_dropped + ?",
                    (next_seq, len(rows), refused),
                )
        return results

    def _append_in(
        self, conn: sqlite3.Connection, topic: str, qos: int, factory: Callable[[int], MessageT]
    ) -> MessageT:
        """One message into the outbox inside the caller's transaction; never refused."""
        seq = int(conn.execute("SELECT next_seq FROM outbox_meta").fetchone()[0])
        message = _outbox_message(topic, qos, factory, seq, self.stream)
        conn.execute(
            "INSERT INTO outbox (seq, msg_id, topic, payload, qos, created_us) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, str(message.msg_id), topic, message.to_json(), qos, _now_us()),
        )
        conn.execute(
            "UPDATE outbox_meta SET next_seq = next_seq + 1, outbox_rows = outbox_rows + 1"
        )
        return message

    def last_seq(self) -> int:
        """The seq given to the newest enqueued message; -1 before the first."""
        return int(self._conn().execute("SELECT next_seq FROM outbox_meta").fetchone()[0]) - 1

    def pending(self, limit: int = 500, after_seq: int = -1) -> list[OutboxRow]:
        """Outbox rows after `after_seq`, oldest first."""
        _check_limit(limit)
        rows = self._conn().execute(
            "SELECT seq, msg_id, topic, payload, qos FROM outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [OutboxRow(s, m, t, bytes(p), q) for s, m, t, p, q in rows]

    def acknowledge(self, upto_seq: int) -> int:
        """Delete every row with seq <= `upto_seq` (the controller's Receipt); return how many."""
        if upto_seq < -1:
            raise ValueError(f"upto_seq: must be at least -1, got {upto_seq}")
        deleted, rows = 0, _ACK_SLICE_ROWS
        while True:
            try:
                with self._write() as conn:
                    oldest = conn.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]
                    if oldest is None or oldest > upto_seq:
                        return deleted
                    bound = min(upto_seq, oldest + rows - 1)
                    count = conn.execute("DELETE FROM outbox WHERE seq <= ?", (bound,)).rowcount
                    conn.execute("UPDATE outbox_meta SET outbox_rows = outbox_rows - ?", (count,))
                    deleted += count
            except sqlite3.OperationalError as exc:
                # A full disk: a delete needs journal space too, and a smaller one needs less.
                # Without this, every receipt would retry the same slice and the outbox that
                # fills the disk could never drain.
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL or rows == 1:
                    raise
                rows = max(1, rows // 2)

    def receipted_upto(self) -> int:
        """The highest seq deleted on a receipt: every seq at or below it was receipted (rows
        leave the outbox only so, oldest first, and a refused message spends no seq)."""
        with self._snapshot() as conn:
            oldest = conn.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]
            if oldest is not None:
                return int(oldest) - 1
            return int(conn.execute("SELECT next_seq FROM outbox_meta").fetchone()[0]) - 1

    def outbox_depth(self) -> int:
        return int(self._conn().execute("SELECT outbox_rows FROM outbox_meta").fetchone()[0])

    @property
    def outbox_full(self) -> bool:
        """True while shadow messages are being refused; the agent reports it as a fault."""
        return self.outbox_depth() >= self.max_outbox_rows

    @property
    def shadow_dropped(self) -> int:
        """Shadow messages refused by the outbox bound, ever (survives restarts)."""
        return int(self._conn().execute("SELECT shadow_dropped FROM outbox_meta").fetchone()[0])

    # -- review queue and images --

    def add_review(self, item: ReviewItem) -> bool:
        """Queue a part for review with its image; False (and nothing changed) if already queued."""
        return self.add_reviews([item])[0]

    def add_reviews(self, items: Sequence[ReviewItem]) -> list[bool]:
        """Queue parts for review with their images, in one commit; for each, False (and
        nothing changed) if that part was already queued.

        Every image is on disk (fsynced) before the commit that names it, and renamed into
        place only for the rows that were inserted: a row never names a missing image; a crash
        leaves at most orphan files, which the quota sweep removes. Until the call returns, its
        files are in flight: this store's sweep leaves them alone, however long the commit takes.
        """
        temps: list[Path] = []
        in_flight: list[str] = []
        try:
            for item in items:
                name = image_name_for(item.part_id)
                self._images_in_flight.add(name)  # before a file of that name can appear
                in_flight.append(name)
            for item in items:
                fd, temp = self._create_temp_image(in_flight)
                temps.append(temp)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(item.image_jpeg)
                    handle.flush()
                    os.fsync(handle.fileno())
            inserted: list[bool] = []
            with self._write() as conn:
                for item, temp in zip(items, temps, strict=True):
                    name = image_name_for(item.part_id)
                    added = conn.execute(
                        "INSERT INTO reviews (part_id, created_us, reason, automation, "
                        "suggestion, confidence, model_label, candidate_label, active_version, "
                        "candidate_version, image_name, image_bytes) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (
                            item.part_id,
                            _us(item.created),
                            item.reason,
                            item.automation,
                            item.suggestion,
                            item.confidence,
                            item.model_label,
                            item.candidate_label,
                            item.active_version,
                            item.candidate_version,
                            name,
                            len(item.image_jpeg),
                        ),
                    ).rowcount
                    if added:
                        os.replace(temp, self.images_dir / name)
                    inserted.append(bool(added))
                if any(inserted):
                    fsync_path(self.images_dir)
            return inserted
        finally:
            for temp in temps:
                temp.unlink(missing_ok=True)
            self._images_in_flight.release(in_flight)

    def _create_temp_image(self, in_flight: list[str]) -> tuple[int, Path]:
        """A new hidden file in the image folder, opened for writing: what `mkstemp` does,
        without its random-name generator (a measurable share of the writer thread). Its name
        goes in flight (and on `in_flight`, for the caller to release) before it exists."""
        while True:
            temp = self.images_dir / f".{os.getpid()}-{next(_TEMP_NAMES)}{_TEMP_SUFFIX}"
            self._images_in_flight.add(temp.name)
            in_flight.append(temp.name)
            try:
                return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), temp
            except FileExistsError:  # left by an earlier process with the same pid
                continue

    def _review_row(self, row: tuple[Any, ...]) -> ReviewRow:
        image_name = row[10]
        return ReviewRow(
            part_id=row[0],
            created=_dt(row[1]),
            reason=row[2],
            automation=row[3],
            suggestion=row[4],
            confidence=row[5],
            model_label=row[6],
            candidate_label=row[7],
            active_version=row[8],
            candidate_version=row[9],
            image_path=None if image_name is None else self.images_dir / str(image_name),
            image_bytes=int(row[11]),
            outcome=row[12],
        )

    def pending_reviews(self, limit: int = 50, oldest_first: bool = True) -> list[ReviewRow]:
        """Parts still waiting for a verdict."""
        _check_limit(limit)
        order = (
            "WHERE v.part_id IS NULL ORDER BY r.created_us, r.part_id LIMIT ?"
            if oldest_first
            else "WHERE v.part_id IS NULL ORDER BY r.created_us DESC, r.part_id DESC LIMIT ?"
        )
        rows = self._conn().execute(
            _SELECT_REVIEWS + order,
            (limit,),
        )
        return [self._review_row(row) for row in rows]

    def review(self, part_id: str) -> ReviewRow | None:
        row = (
            self._conn()
            .execute(
                _SELECT_REVIEWS + "WHERE r.part_id = ?",
                (part_id,),
            )
            .fetchone()
        )
        return None if row is None else self._review_row(row)

    def review_count(self) -> int:
        """Parts waiting for a verdict."""
        return int(
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM reviews r "
                "WHERE NOT EXISTS (SELECT 1 FROM verdicts v WHERE v.part_id = r.part_id)"
            )
            .fetchone()[0]
        )

    def image_path(self, part_id: str) -> Path | None:
        """Where the part's image is, or None when unknown or pruned."""
        row = (
            self._conn()
            .execute("SELECT image_name FROM reviews WHERE part_id = ?", (part_id,))
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        return self.images_dir / str(row[0])

    # -- quota and retention --

    def enforce_quota(self, max_bytes: int) -> QuotaReport:
        """Delete images of verdicted parts, oldest first, until images fit in `max_bytes`.

        Each image counts for the size of its file on disk, not the size its row recorded: an
        image deleted by hand (or lost with a damaged disk) counts for nothing, so it cannot
        hold the station over its quota. Unconfirmed images are never deleted; if they alone
        exceed the quota, the report says by how much and how many, and the agent raises a
        fault.
        """
        if max_bytes < 0:
            raise ValueError(f"max_bytes: must not be negative, got {max_bytes}")
        # Watched from before the rows are read: an image whose row commits after that read
        # was in flight meanwhile, and is spared.
        with self._images_in_flight.watch() as in_flight:
            # An escalated part waits for a supervisor's look: unconfirmed until resolved.
            images = [
                (str(part_id), str(name), bool(confirmed))
                for part_id, name, confirmed in self._conn().execute(
                    "SELECT r.part_id, r.image_name, r.part_id IN (SELECT part_id FROM confirmed) "
                    "FROM reviews r WHERE r.image_name IS NOT NULL ORDER BY r.created_us"
                )
            ]
            orphans, sizes = self._scan_images({name for _, name, _ in images}, in_flight)
        used = sum(sizes.get(name, 0) for _, name, _ in images)
        chosen: list[tuple[str, str]] = []
        left = used
        for part_id, name, confirmed in images:
            if left <= max_bytes:
                break
            if confirmed:
                chosen.append((part_id, name))
                left -= sizes.get(name, 0)
        dropped = self._drop_images(chosen)
        used -= sum(sizes.get(name, 0) for name in dropped)
        over_bytes = max(0, used - max_bytes)
        over_items = 0
        remaining = over_bytes
        for _, name, confirmed in images:
            if remaining <= 0:
                break
            if not confirmed:
                remaining -= sizes.get(name, 0)
                over_items += 1
        return QuotaReport(used, len(dropped), over_items, over_bytes, orphans)

    def _drop_images(self, chosen: list[tuple[str, str]]) -> list[str]:
        """Forget the images of `chosen` (part id, image name) still confirmed, then delete
        their files; the names of those dropped."""
        if not chosen:
            return []
        with self._write() as conn:
            # The row forgets the image before the file goes: a crash leaves an orphan file
            # for the sweep, never a row naming a missing file. Only confirmed rows qualify.
            dropped = [
                name
                for part_id, name in chosen
                if conn.execute(
                    "UPDATE reviews SET image_name = NULL, image_bytes = 0 WHERE part_id = ? "
                    "AND image_name IS NOT NULL AND part_id IN (SELECT part_id FROM confirmed)",
                    (part_id,),
                ).rowcount
            ]
        for name in dropped:
            (self.images_dir / name).unlink(missing_ok=True)
        return dropped

    def _scan_images(
        self, referenced: set[str], in_flight: set[str]
    ) -> tuple[int, dict[str, int]]:
        """Look at every file in the image folder: delete those no row names (crash leftovers)
        once they are old enough, unless an `add_reviews` of this store had them `in_flight`
        while the sweep ran, and measure the others. How many were deleted, and the size on
        disk of each `referenced` image found (one missing is not in it)."""
        cutoff = time.time() - _ORPHAN_GRACE_S
        removed = 0
        sizes: dict[str, int] = {}
        with os.scandir(self.images_dir) as entries:
            for entry in entries:
                try:
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                except FileNotFoundError:
                    # The writer renamed its temporary file into place (or a prune deleted
                    # it) between the listing and the look: nothing to sweep or count.
                    continue
                if entry.name in referenced:
                    sizes[entry.name] = stat.st_size
                elif stat.st_mtime < cutoff and self._images_in_flight.unlink_unless(
                    Path(entry.path), in_flight
                ):
                    removed += 1
        return removed, sizes

    def prune_confirmed(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Forget confirmed parts created before `now - older_than`, images included.

        A verdict (or a supervisor's resolution) not yet in the outbox is kept until
        `publish_verdicts` has taken it; an escalation nobody resolved is kept.
        """
        _check_age(older_than)
        cutoff = _us((now or datetime.now(UTC)) - older_than)
        with self._write() as conn:
            doomed = conn.execute(
                "DELETE FROM reviews WHERE created_us < ? "
                "AND part_id IN (SELECT part_id FROM confirmed) "
                "AND part_id NOT IN (SELECT part_id FROM unpublished) RETURNING image_name",
                (cutoff,),
            ).fetchall()
        for (name,) in doomed:
            if name is not None:
                (self.images_dir / str(name)).unlink(missing_ok=True)
        return len(doomed)

    # -- verdicts --

    def record_verdict(
        self,
        part_id: str,
        operator: str,
        outcome: str,
        label: str | None,
        decided_at: datetime,
    ) -> bool:
        """Write the operator's verdict once; False if the part already has one.

        Raises KeyError when the part was never queued for review.
        """
        _check_choice("outcome", outcome, VerdictOutcome)
        _check_verdict(part_id, operator, label, decided_at)
        with self._write() as conn:
            # The primary key decides who wins a double tap; no read-then-write race.
            written = conn.execute(
                "INSERT INTO verdicts (part_id, operator, outcome, label, decided_at_us) "
                "SELECT part_id, ?, ?, ?, ? FROM reviews WHERE part_id = ? "
                "ON CONFLICT DO NOTHING",
                (operator, outcome, label, _us(decided_at), part_id),
            ).rowcount
            if written:
                return True
            known = conn.execute("SELECT 1 FROM reviews WHERE part_id = ?", (part_id,)).fetchone()
        if known is None:
            raise KeyError(part_id)
        return False

    def resolve_escalation(
        self,
        part_id: str,
        operator: str,
        outcome: str,
        label: str,
        decided_at: datetime,
    ) -> bool:
        """A supervisor's final pass or reject of an escalated part, written once; False if
        it was resolved already. Raises KeyError when the part is not an escalation."""
        if outcome not in (VerdictOutcome.PASS.value, VerdictOutcome.REJECT.value):
            raise ValueError(f"outcome: pass or reject required, got {outcome!r}")
        _check_verdict(part_id, operator, label, decided_at)
        with self._write() as conn:
            written = conn.execute(
                "INSERT INTO resolutions (part_id, operator, outcome, label, decided_at_us) "
                "SELECT part_id, ?, ?, ?, ? FROM verdicts WHERE part_id = ? "
                "AND outcome = 'escalate' ON CONFLICT DO NOTHING",
                (operator, outcome, label, _us(decided_at), part_id),
            ).rowcount
            if written:
                return True
            escalated = conn.execute(
                "SELECT 1 FROM verdicts WHERE part_id = ? AND outcome = 'escalate'", (part_id,)
            ).fetchone()
        if escalated is None:
            raise KeyError(part_id)
        return False

    def correct_verdict(
        self,
        part_id: str,
        operator: str,
        outcome: str,
        label: str,
        decided_at: datetime,
    ) -> bool:
        """A supervisor's correction of an operator's pass or reject (a wrong button tapped):
        the other outcome, kept as the part's resolution and published as a second, labelled
        Verdict, which the controller takes as the part's truth. Written once per part; False
        if the part has a supervisor's verdict already. KeyError when the part has no
        operator's pass or reject (any more); ValueError when `outcome` is the one given."""
        if outcome not in (VerdictOutcome.PASS.value, VerdictOutcome.REJECT.value):
            raise ValueError(f"outcome: pass or reject required, got {outcome!r}")
        _check_verdict(part_id, operator, label, decided_at)
        with self._write() as conn:
            given = conn.execute(
                "SELECT v.outcome FROM verdicts v JOIN reviews r USING (part_id) "
                "WHERE v.part_id = ? AND v.outcome IN ('pass', 'reject')", (part_id,)
            ).fetchone()
            written = 0
            if given is not None and given[0] != outcome:
                written = conn.execute(
                    "INSERT INTO resolutions (part_id, operator, outcome, label, decided_at_us) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (part_id, operator, outcome, label, _us(decided_at)),
                ).rowcount
        if given is None:
            raise KeyError(part_id)
        if given[0] == outcome:
            raise ValueError(f"outcome: the part's verdict is {outcome} already")
        return bool(written)

    def correctable_verdicts(self, limit: int = 20) -> list[VerdictRow]:
        """Operators' passes and rejects a supervisor may still correct (no resolution yet),
        the latest first."""
        _check_limit(limit)
        rows = self._conn().execute(
            _SELECT_VERDICTS + "WHERE v.outcome IN ('pass', 'reject') AND v.part_id NOT IN "  # noqa: S608 - literals
            "(SELECT part_id FROM resolutions) ORDER BY v.decided_at_us DESC, v.part_id LIMIT ?",
            (limit,),
        )
        return [self._verdict_row(row) for row in rows]

    def escalations(self, limit: int = 50) -> list[Escalation]:
        """Escalated parts no supervisor has resolved yet, oldest escalation first."""
        _check_limit(limit)
        rows = self._conn().execute(
            _SELECT_ESCALATIONS + "ORDER BY v.decided_at_us, r.part_id LIMIT ?", (limit,)
        )
        return [
            Escalation(
                review=self._review_row(row[:-2]), operator=row[-2], escalated_at=_dt(row[-1])
            )
            for row in rows
        ]

    def escalation_count(self) -> int:
        """Escalated parts waiting for a supervisor."""
        return int(
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM verdicts WHERE outcome = 'escalate' "
                "AND part_id NOT IN (SELECT part_id FROM confirmed)"
            )
            .fetchone()[0]
        )

    @staticmethod
    def _verdict_row(row: tuple[Any, ...]) -> VerdictRow:
        return VerdictRow(
            part_id=row[0],
            operator=row[1],
            outcome=row[2],
            label=row[3],
            decided_at=_dt(row[4]),
            review_reason=row[5],
            model_label=row[6],
            candidate_label=row[7],
            active_version=row[8],
            candidate_version=row[9],
            published_seq=row[10],
        )

    def unpublished_verdicts(self, limit: int = 100) -> list[VerdictRow]:
        """Operators' verdicts, then supervisors' resolutions, not yet in the outbox."""
        _check_limit(limit)
        conn = self._conn()
        rows = conn.execute(
            _SELECT_VERDICTS
            + "WHERE v.published_seq IS NULL ORDER BY v.decided_at_us, v.part_id LIMIT ?",
            (limit,),
        ).fetchall()
        rows += conn.execute(
            _SELECT_RESOLUTIONS
            + "WHERE x.published_seq IS NULL ORDER BY x.decided_at_us, x.part_id LIMIT ?",
            (limit - len(rows),),
        ).fetchall()
        return [self._verdict_row(row) for row in rows]

    def publish_verdicts(
        self,
        topic_for: Callable[[VerdictRow], str],
        factory: Callable[[VerdictRow, int], Envelope],
        limit: int = 100,
        qos: int = 1,
    ) -> list[Envelope]:
        """Move unpublished verdicts into the outbox, one transaction per verdict.

        Each transaction enqueues the message and marks the verdict published, so a crash
        can neither lose a verdict nor send it twice. The outbox bound never refuses these.
        A supervisor's resolution of an escalated part goes out as a second Verdict for the
        part, after the operator's escalation.
        """
        messages: list[Envelope] = []
        for candidate in self.unpublished_verdicts(limit):
            with self._write() as conn:
                row = conn.execute(
                    _SELECT_VERDICTS + "WHERE v.part_id = ? AND v.published_seq IS NULL",
                    (candidate.part_id,),
                ).fetchone()
                table = "verdicts"
                if row is None:
                    # A resolution, once its escalation is out (the controller keeps the
                    # latest labelled verdict of a part as its truth).
                    row = conn.execute(
                        _SELECT_RESOLUTIONS + "WHERE x.part_id = ? AND x.published_seq IS NULL "
                        "AND v.published_seq IS NOT NULL",
                        (candidate.part_id,),
                    ).fetchone()
                    table = "resolutions"
                if row is None:
                    continue  # another publisher took it between the listing and now
                verdict = self._verdict_row(row)
                message = self._append_in(
                    conn, topic_for(verdict), qos, functools.partial(factory, verdict)
                )
                conn.execute(
                    f"UPDATE {table} SET published_seq = ? WHERE part_id = ?",  # noqa: S608
                    (message.seq, verdict.part_id),
                )
            messages.append(message)
        return messages

    def verdicts_since(self, since: datetime) -> list[VerdictRow]:
        """Verdicts decided at or after `since`, oldest first (for the UI's statistics)."""
        _check_aware("since", since)
        rows = self._conn().execute(
            _SELECT_VERDICTS + "WHERE v.decided_at_us >= ? ORDER BY v.decided_at_us, v.part_id",
            (_us(since),),
        )
        return [self._verdict_row(row) for row in rows]

    # -- command log --

    def command_result(self, cmd_id: str) -> str | None:
        """The ack JSON stored for a command already handled, or None."""
        row = (
            self._conn()
            .execute("SELECT ack_json FROM commands WHERE cmd_id = ?", (cmd_id,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def record_command(self, cmd_id: str, name: str, ack_json: str) -> None:
        """Remember a command's ack; the first one recorded for a cmd_id stays."""
        if not cmd_id:
            raise ValueError("cmd_id: must not be empty")
        with self._write() as conn:
            self._record_command_in(conn, cmd_id, name, ack_json)

    @staticmethod
    def _record_command_in(conn: sqlite3.Connection, cmd_id: str, name: str, ack_json: str) -> None:
        conn.execute(
            "INSERT INTO commands (cmd_id, name, ack_json, created_us) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (cmd_id, name, ack_json, _now_us()),
        )

    # -- documents: model slots and the status snapshot --

    def _save_doc(
        self, name: str, doc: dict[str, Any], *, durable: bool,
        command: tuple[str, str, str] | None = None, requests: Sequence[int] = (),
    ) -> None:
        if not isinstance(doc, dict):
            raise ValueError(f"doc: a JSON object is required, got {type(doc).__name__}")
        if command is not None and not command[0]:
            raise ValueError("cmd_id: must not be empty")
        try:
            text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"doc: not storable as JSON: {exc}") from exc
        with self._write(durable=durable) as conn:
            conn.execute(
                "INSERT INTO documents (name, doc, updated_us) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET doc = excluded.doc, "
                "updated_us = excluded.updated_us",
                (name, text, _now_us()),
            )
            if command is not None:
                self._record_command_in(conn, *command)
            self._take_requests_in(conn, requests)

    def _load_doc(self, name: str) -> tuple[dict[str, Any], datetime] | None:
        row = (
            self._conn()
            .execute("SELECT doc, updated_us FROM documents WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None:
            return None
        doc: dict[str, Any] = json.loads(row[0])
        return doc, _dt(row[1])

    def save_slots(
        self, doc: dict[str, Any], command: tuple[str, str, str] | None = None,
        requests: Sequence[int] = (),
    ) -> None:
        """What the station runs (active, candidate, previous); must survive a power cut.

        `command` (cmd_id, name, ack JSON) is the command whose change this is, recorded in the
        same commit: a crash can never keep the change and forget that the command was done.
        `requests` are the ids of the screen's requests whose change `doc` carries, taken in
        the same commit: a request counts as taken only once its change is saved.
        """
        self._save_doc(_SLOTS_DOC, doc, durable=True, command=command, requests=requests)

    def load_slots(self) -> dict[str, Any] | None:
        loaded = self._load_doc(_SLOTS_DOC)
        return None if loaded is None else loaded[0]

    def save_status(self, doc: dict[str, Any]) -> None:
        """The agent's snapshot for the UI; rewritten every second, so no fsync of its own."""
        self._save_doc(_STATUS_DOC, doc, durable=False)

    def load_status(self) -> tuple[dict[str, Any], datetime] | None:
        """The last snapshot and when it was written (the UI shows a stale agent as such)."""
        return self._load_doc(_STATUS_DOC)

    # -- part log and shift statistics --

    def log_part(self, entry: PartLogEntry) -> None:
        self.log_parts([entry])

    def log_parts(self, entries: Sequence[PartLogEntry]) -> None:
        """Several parts in one transaction. Statistics only: no fsync of its own (the next
        outbox commit carries it to disk)."""
        with self._write(durable=False) as conn:
            conn.executemany(_INSERT_PART_LOG, [_part_log_row(entry) for entry in entries])

    @staticmethod
    def _log_parts_in(conn: sqlite3.Connection, entries: Sequence[PartLogEntry]) -> None:
        """Part log rows inside the caller's transaction, behind a savepoint: statistics never
        cost the messages they ride with."""
        conn.execute("SAVEPOINT part_log")
        try:
            conn.executemany(_INSERT_PART_LOG, [_part_log_row(entry) for entry in entries])
        except sqlite3.Error:
            conn.execute("ROLLBACK TO part_log")
            log.exception("part log of %d parts not stored", len(entries))
        finally:
            conn.execute("RELEASE part_log")

    def part_ids_to_avoid(self, prefix: str) -> list[str]:
        """Part ids starting with ``prefix`` that a restarted source must not hand out again:
        the latest one in the part log and every one in the review queue."""
        size = len(prefix)
        with self._snapshot() as conn:
            latest = conn.execute(
                "SELECT part_id FROM part_log WHERE substr(part_id, 1, ?) = ? "
                "ORDER BY id DESC LIMIT 1",
                (size, prefix),
            ).fetchall()
            queued = conn.execute(
                "SELECT part_id FROM reviews WHERE substr(part_id, 1, ?) = ?", (size, prefix)
            ).fetchall()
        return [str(row[0]) for row in latest + queued]

    def part_stats(self, since: datetime, until: datetime | None = None) -> PartStats:
        """The shift's figures from `since`. The throughput chart ends at `until` (default:
        now): a part logged ahead of it (a station clock that was ahead, since corrected) counts
        in the totals but draws no minutes up to its time stamp."""
        _check_aware("since", since)
        since_us = _us(since)
        until_us = _us(until or datetime.now(UTC))
        with self._snapshot() as conn:
            parts, pairs, agreed = conn.execute(
                "SELECT COUNT(*), COUNT(agree), COALESCE(SUM(agree), 0) FROM part_log "
                "WHERE ts_us >= ?",
                (since_us,),
            ).fetchone()
            actions = dict(
                conn.execute(
                    "SELECT action, COUNT(*) FROM part_log WHERE ts_us >= ? GROUP BY action",
                    (since_us,),
                ).fetchall()
            )
            decided_by = dict(
                conn.execute(
                    "SELECT decided_by, COUNT(*) FROM part_log WHERE ts_us >= ? "
                    "GROUP BY decided_by",
                    (since_us,),
                ).fetchall()
            )
            verdicts, om_pairs, om_agreed = conn.execute(
                "SELECT COUNT(*), "
                "COUNT(CASE WHEN v.label IS NOT NULL AND r.model_label IS NOT NULL THEN 1 END), "
                "COUNT(CASE WHEN v.label = r.model_label THEN 1 END) "
                "FROM verdicts v JOIN reviews r USING (part_id) WHERE v.decided_at_us >= ?",
                (since_us,),
            ).fetchone()
            buckets = conn.execute(
                "SELECT ts_us / 60000000 AS minute, COUNT(*) FROM part_log "
                "WHERE ts_us >= ? AND ts_us <= ? GROUP BY minute ORDER BY minute",
                (since_us, until_us),
            ).fetchall()
        throughput: list[tuple[datetime, int]] = []
        if buckets:
            counts = dict(buckets)
            for minute in range(buckets[0][0], buckets[-1][0] + 1):
                throughput.append((_dt(minute * 60_000_000), counts.get(minute, 0)))
        return PartStats(
            since=since,
            parts=parts,
            actions=actions,
            decided_by=decided_by,
            shadow_pairs=pairs,
            agreement_rate=agreed / pairs if pairs else None,
            verdicts=verdicts,
            operator_model_pairs=om_pairs,
            operator_model_agreement=om_agreed / om_pairs if om_pairs else None,
            throughput=throughput,
        )

    def prune_part_log(self, older_than: timedelta, now: datetime | None = None) -> int:
        _check_age(older_than)
        cutoff = _us((now or datetime.now(UTC)) - older_than)
        with self._write() as conn:
            return int(conn.execute("DELETE FROM part_log WHERE ts_us < ?", (cutoff,)).rowcount)

    def prune_history(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Forget commands and taken UI requests older than `older_than`; a command repeated
        after that is carried out again, so keep it longer than any command's expiry."""
        _check_age(older_than)
        cutoff = _us((now or datetime.now(UTC)) - older_than)
        with self._write() as conn:
            commands = conn.execute("DELETE FROM commands WHERE created_us < ?", (cutoff,))
            requests = conn.execute(
                "DELETE FROM ui_requests WHERE taken_us IS NOT NULL AND created_us < ?", (cutoff,)
            )
            return int(commands.rowcount) + int(requests.rowcount)

    # -- operators --

    def upsert_operator(self, badge: str, name: str, role: str, pin_hash: str) -> None:
        """Create or update an operator; the UI hashes the PIN, the store keeps the hash."""
        if not badge:
            raise ValueError("badge: must not be empty")
        if not name:
            raise ValueError("name: must not be empty")
        if role not in OPERATOR_ROLES:
            raise ValueError(f"role: {role!r} is not one of {list(OPERATOR_ROLES)}")
        if not pin_hash:
            raise ValueError("pin_hash: must not be empty")
        now = _now_us()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO operators (badge, name, role, pin_hash, created_us, updated_us) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (badge) DO UPDATE SET "
                "name = excluded.name, role = excluded.role, pin_hash = excluded.pin_hash, "
                "updated_us = excluded.updated_us",
                (badge, name, role, pin_hash, now, now),
            )

    def operator(self, badge: str) -> OperatorRow | None:
        row = (
            self._conn()
            .execute(
                "SELECT badge, name, role, pin_hash, created_us, updated_us FROM operators "
                "WHERE badge = ?",
                (badge,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return OperatorRow(row[0], row[1], row[2], row[3], _dt(row[4]), _dt(row[5]))

    # -- requests from the UI to the agent --

    def request_automation(self, level: str, reason: str, by: str) -> int:
        """Ask the agent to change the automation level; returns the request's id.

        Raises `TooManyOpenRequests` when `MAX_OPEN_REQUESTS` wait already: an open request is
        never pruned, and a station that is stopped, stuck or cannot save would otherwise be
        left an endless list to make in turn (a durable save each, on its inspection loop).
        """
        _check_choice("level", level, AutomationLevel)
        if not by:
            raise ValueError("by: must name who asks")
        with self._write() as conn:
            waiting = int(conn.execute(
                "SELECT COUNT(*) FROM ui_requests WHERE taken_us IS NULL"
            ).fetchone()[0])
            if waiting >= MAX_OPEN_REQUESTS:
                raise TooManyOpenRequests(waiting)
            cursor = conn.execute(
                "INSERT INTO ui_requests (kind, level, reason, requested_by, created_us) "
                "VALUES ('automation', ?, ?, ?, ?)",
                (level, reason, by, _now_us()),
            )
            return int(cursor.lastrowid or 0)

    def open_requests(self, after: int = 0) -> list[UiRequest]:
        """The requests not taken yet, oldest first, from the one after request id `after`.

        Reading takes nothing: a request is taken only by the save of the slots that carries
        its change (`save_slots(..., requests=...)`), so one whose save never happened (a full
        disk, then a restart) is still here for the agent to make after its restart. Ids only
        grow (each request is one write, and writes take turns), so an agent that remembers
        the last id it took in hand never hands out one twice.
        """
        if after < 0:
            raise ValueError(f"after: must be 0 or more, got {after}")
        rows = self._conn().execute(
            "SELECT id, kind, level, reason, requested_by, created_us FROM ui_requests "
            "WHERE taken_us IS NULL AND id > ? ORDER BY id",
            (after,),
        ).fetchall()
        return [UiRequest(r[0], r[1], r[2], r[3], r[4], _dt(r[5])) for r in rows]

    @staticmethod
    def _take_requests_in(conn: sqlite3.Connection, requests: Sequence[int]) -> None:
        conn.executemany(
            "UPDATE ui_requests SET taken_us = ? WHERE id = ? AND taken_us IS NULL",
            [(_now_us(), request) for request in requests],
        )

    # -- the UI's live sign-ins --

    def start_ui_session(
        self,
        session_id: str,
        now: datetime,
        max_age: timedelta,
        max_sessions: int = MAX_UI_SESSIONS,
    ) -> None:
        """Record a sign-in as live from `now`; in the same transaction, forget sign-ins older
        than `max_age` and, past `max_sessions`, the oldest ones."""
        _check_session_id(session_id)
        _check_aware("now", now)
        _check_max_age(max_age)
        if max_sessions < 1:
            raise ValueError(f"max_sessions: must be at least 1, got {max_sessions}")
        now_us = _us(now)
        with self._write() as conn:
            conn.execute(
                "DELETE FROM ui_sessions WHERE started_us < ?", (now_us - _span_us(max_age),)
            )
            conn.execute(
                "INSERT INTO ui_sessions (id, started_us) VALUES (?, ?)", (session_id, now_us)
            )
            # The newest `max_sessions` stay, in the order they were made (the rowid): after
            # the wall clock was set back, the sign-in just made reads older than earlier ones.
            conn.execute(
                "DELETE FROM ui_sessions WHERE rowid IN (SELECT rowid FROM ui_sessions "
                "ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
                (max_sessions,),
            )

    def ui_session_live(self, session_id: str, now: datetime, max_age: timedelta) -> bool:
        """Whether the sign-in is recorded and no older than `max_age` at `now`."""
        _check_aware("now", now)
        _check_max_age(max_age)
        row = (
            self._conn()
            .execute(
                "SELECT 1 FROM ui_sessions WHERE id = ? AND started_us >= ?",
                (session_id, _us(now) - _span_us(max_age)),
            )
            .fetchone()
        )
        return row is not None

    def end_ui_session(self, session_id: str) -> bool:
        """Forget a sign-in; False if it was not recorded (already ended, expired or evicted)."""
        with self._write() as conn:
            return bool(
                conn.execute("DELETE FROM ui_sessions WHERE id = ?", (session_id,)).rowcount
            )

    def ui_session_count(self) -> int:
        """Sign-ins recorded, expired ones included until the next sign-in forgets them."""
        return int(self._conn().execute("SELECT COUNT(*) FROM ui_sessions").fetchone()[0])
