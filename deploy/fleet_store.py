"""The fleet controller's store: every durable station message, the fleet inventory, rollouts.

`FleetStore` is the interface the controller codes against; `SqliteFleetStore` implements it on
one SQLite file in WAL mode. A PostgreSQL store can implement the same interface later (see
docs/decisions/0005-fleet-store.md).

Stations number their durable messages (decision, shadow, verdict, ack) with a per-station `seq`
and keep them in their outbox until a Receipt covers them. A station's seq counts in its seq
`stream`: a station whose storage was replaced starts a new stream at seq 0 under the same
station id. The store keys those messages by `(station, stream, seq)`, so a redelivered message
collapses onto the first copy, and keeps a watermark per stream: the highest seq below which
nothing is missing. That watermark is what the controller receipts, so it is advanced only after
the rows it covers are committed. A station whose store was restored from a backup numbers new
messages with seqs it had already used: a message under a taken seq with another msg_id is
stored beside the first, never dropped, since the station deletes it on the next receipt.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from deploy.fleet_tally import Disputes, SeriesCounts, SlowestLatencies
from deploy.gates import PairedEvidence
from deploy.rollout import TERMINAL, Phase, StageEvidence
from linesight.protocol import (
    CommandAck,
    Decision,
    Envelope,
    ShadowResult,
    StationMetrics,
    StationState,
    Verdict,
)
from linesight.sqlite_db import SqliteDatabase, Transaction

__all__ = [
    "METRICS_HISTORY",
    "SCHEMA_VERSION",
    "FleetStore",
    "FleetStoreError",
    "MissedReports",
    "SeriesPoint",
    "SqliteFleetStore",
    "StationRecord",
    "StreamKey",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
METRICS_HISTORY = 720
"""Metrics reports kept per station for plots (an hour at one report every five seconds)."""
DEFAULT_BUSY_TIMEOUT_S = 10.0
_WAL_LIMIT_BYTES = 32 * 1024 * 1024
# The controller's seq is reserved on disk a block at a time, so handing one out costs no commit
# and a restart (or a power cut) continues above everything that may have been sent.
_SEQ_BLOCK = 1024
_TERMINAL_PHASES = json.dumps(sorted(phase.value for phase in TERMINAL))

# Stations interleave, so a b-tree keyed by station dirties one page per station per batch;
# only the dedup key, the dashboard's decision index and the (rare) verdicts are keyed so. The
# per-kind tables share the message's rowid and grow at the end, like the time-keyed indexes.
_SCHEMA_V1: tuple[str, ...] = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        seq_reserved INTEGER NOT NULL CHECK (seq_reserved >= 0)
    )""",
    "INSERT INTO meta (id, seq_reserved) VALUES (0, 0)",
    # One row per station heard of: inventory (retained state / Last Will), the contiguity
    # watermark of its seq stream, and its latest metrics report.
    """CREATE TABLE stations (
        station TEXT PRIMARY KEY,
        watermark INTEGER NOT NULL DEFAULT -1,
        max_seq INTEGER NOT NULL DEFAULT -1,
        online INTEGER NOT NULL DEFAULT 0,
        state_json TEXT,
        labels_json TEXT NOT NULL DEFAULT '{}',
        last_seen_us INTEGER,
        metrics_json TEXT,
        metrics_ts_us INTEGER,
        metrics_count INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        station TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        payload TEXT NOT NULL
    )""",
    "CREATE UNIQUE INDEX messages_key ON messages (station, seq)",
    """CREATE TABLE decisions (
        id INTEGER PRIMARY KEY REFERENCES messages (id),
        station TEXT NOT NULL,
        seq INTEGER NOT NULL,
        part_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        decided_by TEXT NOT NULL,
        action TEXT NOT NULL,
        label TEXT,
        confidence REAL,
        review_reason TEXT,
        model_version TEXT,
        model_sha256 TEXT,
        latency_ms REAL NOT NULL
    )""",
    "CREATE INDEX decisions_station_ts ON decisions (station, ts_us, action)",
    "CREATE INDEX decisions_ts ON decisions (ts_us, station, action)",
    """CREATE TABLE shadows (
        id INTEGER PRIMARY KEY REFERENCES messages (id),
        station TEXT NOT NULL,
        seq INTEGER NOT NULL,
        part_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        paired INTEGER NOT NULL,
        agree INTEGER NOT NULL,
        active_label TEXT,
        candidate_label TEXT,
        active_confidence REAL,
        candidate_confidence REAL,
        active_latency_ms REAL NOT NULL,
        candidate_latency_ms REAL NOT NULL,
        active_version TEXT NOT NULL,
        active_sha256 TEXT NOT NULL,
        candidate_version TEXT NOT NULL,
        candidate_sha256 TEXT NOT NULL
    )""",
    # Covers the gate's counts and p95: a candidate's rows are only its rollout's stations.
    """CREATE INDEX shadows_candidate_ts ON shadows
        (candidate_sha256, ts_us, station, paired, agree, candidate_latency_ms)""",
    # Disagreements are a few percent of the rows; only they need a verdict looked up.
    """CREATE INDEX shadows_disagreements ON shadows
        (candidate_sha256, ts_us, station, part_id, candidate_label, paired, agree)
        WHERE paired = 1 AND agree = 0""",
    "CREATE INDEX shadows_ts ON shadows (ts_us, station, paired, agree)",
    """CREATE TABLE verdicts (
        id INTEGER PRIMARY KEY REFERENCES messages (id),
        station TEXT NOT NULL,
        seq INTEGER NOT NULL,
        part_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        operator TEXT NOT NULL,
        outcome TEXT NOT NULL,
        label TEXT
    )""",
    "CREATE INDEX verdicts_station_part ON verdicts (station, part_id)",
    """CREATE TABLE acks (
        id INTEGER PRIMARY KEY REFERENCES messages (id),
        station TEXT NOT NULL,
        seq INTEGER NOT NULL,
        cmd_id TEXT NOT NULL,
        ts_us INTEGER NOT NULL,
        command TEXT NOT NULL,
        ok INTEGER NOT NULL,
        error TEXT
    )""",
    "CREATE INDEX acks_cmd ON acks (cmd_id)",
    # A ring of METRICS_HISTORY slots per station: bounded without a delete per report.
    """CREATE TABLE metrics_history (
        station TEXT NOT NULL,
        slot INTEGER NOT NULL,
        ts_us INTEGER NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (station, slot)
    ) WITHOUT ROWID""",
    """CREATE TABLE rollouts (
        rollout_id TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        state_json TEXT NOT NULL,
        updated_us INTEGER NOT NULL
    )""",
    "CREATE INDEX rollouts_updated ON rollouts (updated_us)",
)
# Index i holds the statements that take the schema from version i to i + 1.
# Retention: old receipted messages are pruned by age.
_SCHEMA_V2: tuple[str, ...] = ("CREATE INDEX messages_ts ON messages (ts_us)",)

# Seq streams: a station's messages are keyed by (station, stream, seq), and each stream has
# its own watermark. '' is the stream of messages that name none (stations from before streams).
_SCHEMA_V3: tuple[str, ...] = (
    "ALTER TABLE messages ADD COLUMN stream TEXT NOT NULL DEFAULT ''",
    "DROP INDEX messages_key",
    "CREATE UNIQUE INDEX messages_key ON messages (station, stream, seq)",
    """CREATE TABLE streams (
        station TEXT NOT NULL,
        stream TEXT NOT NULL,
        watermark INTEGER NOT NULL DEFAULT -1,
        max_seq INTEGER NOT NULL DEFAULT -1,
        PRIMARY KEY (station, stream)
    ) WITHOUT ROWID""",
    "INSERT INTO streams (station, stream, watermark, max_seq) "
    "SELECT station, '', watermark, max_seq FROM stations WHERE max_seq >= 0",
    "ALTER TABLE stations DROP COLUMN watermark",
    "ALTER TABLE stations DROP COLUMN max_seq",
)

# The label the rollout's candidate calls a defect (its manifest's defect_label), which the
# escaped-defect gate counts; NULL for rollouts saved before it was kept.
_SCHEMA_V4: tuple[str, ...] = ("ALTER TABLE rollouts ADD COLUMN defect_label TEXT",)

# Retention counts from when the controller received a message, not from the station's `ts`:
# a station whose clock is behind (an RTC reset to 2000) would otherwise see its records pruned
# within the hour, after it had deleted its own copies on their receipts.
_SCHEMA_V5: tuple[str, ...] = (
    "ALTER TABLE messages ADD COLUMN received_us INTEGER",
    "UPDATE messages SET received_us = ts_us",
    "CREATE INDEX messages_received ON messages (received_us)",
)
# A seq may hold more than one message: a station whose store was restored from a backup gives
# out seqs again, for other messages, and a receipt deletes them on the station. Each msg_id is
# stored once under its key.
_SCHEMA_V6: tuple[str, ...] = (
    "DROP INDEX messages_key",
    "CREATE UNIQUE INDEX messages_key ON messages (station, stream, seq, msg_id)",
)
# A stage's evidence is what this controller received since the stage began, whatever the
# station's clock says: one running ahead dated results from before the stage after its start,
# one running behind dated the stage's own before it. Shadow results keep their message's time
# of receipt (rows from before schema 5 have their ts there), and the gate's two indexes are
# keyed by it instead of ts. The dashboard's series stay dated by the station (shadows_ts).
_SCHEMA_V7: tuple[str, ...] = (
    "ALTER TABLE shadows ADD COLUMN received_us INTEGER",
    "UPDATE shadows SET received_us = coalesce("
    "(SELECT m.received_us FROM messages m WHERE m.id = shadows.id), ts_us)",
    "DROP INDEX shadows_candidate_ts",
    "DROP INDEX shadows_disagreements",
    """CREATE INDEX shadows_candidate_received ON shadows
        (candidate_sha256, received_us, station, paired, agree, candidate_latency_ms)""",
    """CREATE INDEX shadows_disagreements ON shadows
        (candidate_sha256, received_us, station, part_id, candidate_label, paired, agree)
        WHERE paired = 1 AND agree = 0""",
)
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6, _SCHEMA_V7
)
# The next rows received before the cutoff, in the index's order (received_us, id), after the
# last one read: first the rest of its received_us (one ingest batch shares it), then later ones;
# whether each was receipted. Two statements: SQLite ranges over the index's implicit rowid
# only under an equality on received_us.
_PRUNE_RECEIPTED = (
    "SELECT m.id, m.received_us, coalesce(m.seq <= s.watermark, 0) "
    "FROM messages m INDEXED BY messages_received "
    "LEFT JOIN streams s ON s.station = m.station AND s.stream = m.stream "
)
_PRUNE_SAME_ARRIVAL = (
    _PRUNE_RECEIPTED + "WHERE m.received_us = ? AND m.id > ? ORDER BY m.id LIMIT ?"
)
_PRUNE_LATER_ARRIVAL = (
    _PRUNE_RECEIPTED + "WHERE m.received_us > ? AND m.received_us < ? "
    "ORDER BY m.received_us, m.id LIMIT ?"
)
_PRUNE = tuple(
    f"DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?))"  # noqa: S608 - literals
    for table in ("decisions", "shadows", "verdicts", "acks", "messages")
)


class StreamKey(NamedTuple):
    """One station's seq stream; `stream` is None for messages that name none."""

    station: str
    stream: uuid.UUID | None = None


_MessageKey = tuple[str, str, int, str]
"""(station, stream as stored, seq, msg_id): one durable message."""


def _stream_text(stream: uuid.UUID | None) -> str:
    return "" if stream is None else str(stream)


def _stream_key(station: str, text: str) -> StreamKey:
    return StreamKey(station, uuid.UUID(text) if text else None)


class FleetStoreError(Exception):
    """The store cannot be used as asked (closed, or written by a newer controller)."""


@dataclass(frozen=True, slots=True)
class StationRecord:
    """What the controller knows of one station."""

    station: str
    online: bool
    state: StationState | None
    last_seen: datetime | None
    """When an online state was last received; an offline Last Will leaves it unchanged."""
    labels: dict[str, str] = field(default_factory=dict)
    latest_metrics: StationMetrics | None = None


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One time bucket of the dashboard's plots."""

    start: datetime
    parts: int
    """Decisions made in the bucket."""
    actions: dict[str, int]
    shadow_pairs: int
    """Shadow results where both models gave a label."""
    agreements: int
    agreement_rate: float | None


@dataclass(frozen=True, slots=True)
class MissedReports:
    """A station's metrics reports since those already read, for the parts it missed."""

    count: int
    """The number of its latest report (its first is 1)."""
    whole: bool
    """True: `reports` are all its reports the store keeps, not only the new ones (nothing was
    read before, or more came since than the store keeps)."""
    reports: list[tuple[datetime, int | None]]
    """(ts, parts_missed) of each report; None where the report does not carry it."""


class FleetStore(Protocol):
    """The controller's store. Every method is safe to call from any thread."""

    def ingest(
        self, messages: Sequence[Envelope], received: datetime | None = None
    ) -> dict[StreamKey, int]:
        """Store a batch in one transaction; return each seq stream's highest contiguous seq.
        `received` (default now) is when retention counts the messages from."""
        ...

    def contiguous(self, station: str, stream: uuid.UUID | None = None) -> int: ...

    def resume(self, key: StreamKey, receipted_upto: int) -> int | None:
        """Raise the stream's watermark to what the station says was receipted; the new
        watermark if it moved, else None."""
        ...

    def record_state(self, state: StationState, received_at: datetime) -> None: ...

    def stations(self) -> list[StationRecord]: ...

    def metrics_history(
        self, station: str, since: datetime | None = None
    ) -> list[StationMetrics]: ...

    def parts_missed_reports(self, seen: Mapping[str, int]) -> dict[str, MissedReports]: ...

    def paired_evidence(
        self,
        stations: Sequence[str],
        since: datetime,
        candidate_sha256: str,
        defect_label: str = "defect",
    ) -> StageEvidence: ...

    def evidence_series(
        self,
        stations: Sequence[str],
        since: datetime,
        bucket_s: int,
        candidate_sha256: str | None = None,
        until: datetime | None = None,
    ) -> list[SeriesPoint]: ...

    def decision_counts(self, since: datetime) -> dict[str, dict[str, int]]: ...

    def ack(self, cmd_id: str) -> CommandAck | None: ...

    def save_rollout(
        self,
        rollout_id: str,
        phase: str,
        state_json: str,
        updated: datetime,
        defect_label: str | None = None,
    ) -> None:
        """Write a rollout's state; `defect_label` is kept as it was when None."""
        ...

    def rollout(self, rollout_id: str) -> str | None: ...

    def rollout_defect_label(self, rollout_id: str) -> str | None: ...

    def active_rollout(self) -> tuple[str, str] | None: ...

    def latest_rollout(self) -> tuple[str, str] | None: ...

    def rollouts(self, limit: int = 20) -> list[tuple[str, str, datetime]]: ...

    def promoted_rollouts(self) -> list[str]: ...

    def next_seq(self) -> int: ...

    def prune(self, before: datetime) -> int:
        """Delete receipted messages older than `before`; how many were deleted."""
        ...

    def decisions(
        self,
        station: str | None = None,
        since: datetime | None = None,
        limit: int = 100_000,
    ) -> list[Decision]: ...

    def close(self) -> None: ...


# --- time helpers ----------------------------------------------------------------------------


def _us(moment: datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {moment!r}")
    # Integer microseconds since the epoch: exact round trips and cheap range scans.
    return round(moment.timestamp() * 1_000_000)


def _dt(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def _ring_slots(after: int, count: int) -> list[tuple[int, int]]:
    """The metrics_history slots of a station's reports after+1 .. count (report k is in slot
    (k - 1) % METRICS_HISTORY), as one or two inclusive ranges; count - after < the ring."""
    first, last = after % METRICS_HISTORY, (count - 1) % METRICS_HISTORY
    return [(first, last)] if first <= last else [(first, METRICS_HISTORY - 1), (0, last)]


def _stations_param(stations: Sequence[str]) -> str:
    if isinstance(stations, str):
        raise TypeError("stations: a sequence of station ids, not one string")
    return json.dumps(sorted(set(stations)))


# --- rows per message kind -------------------------------------------------------------------

_INSERT_MESSAGE = (
    "INSERT INTO messages (id, station, seq, stream, kind, msg_id, ts_us, payload, received_us) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DECISION = (
    "INSERT INTO decisions (id, station, seq, part_id, ts_us, decided_by, action, label, "
    "confidence, review_reason, model_version, model_sha256, latency_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SHADOW = (
    "INSERT INTO shadows (id, station, seq, part_id, ts_us, paired, agree, active_label, "
    "candidate_label, active_confidence, candidate_confidence, active_latency_ms, "
    "candidate_latency_ms, active_version, active_sha256, candidate_version, candidate_sha256, "
    "received_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_VERDICT = (
    "INSERT INTO verdicts (id, station, seq, part_id, ts_us, operator, outcome, label) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ACK = (
    "INSERT INTO acks (id, station, seq, cmd_id, ts_us, command, ok, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SET_STREAM_MARKS = (
    "INSERT INTO streams (station, stream, watermark, max_seq) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (station, stream) DO UPDATE SET "
    "watermark = excluded.watermark, max_seq = excluded.max_seq"
)
# A station is in the inventory from its first message, state or not.
_ADD_STATION = "INSERT INTO stations (station) VALUES (?) ON CONFLICT (station) DO NOTHING"
_STREAM_KINDS: dict[type[Envelope], str] = {
    Decision: "decision",
    ShadowResult: "shadow",
    Verdict: "verdict",
    CommandAck: "ack",
}


@dataclass(slots=True)
class _Rows:
    """The parameter lists of one ingest batch, one list per statement."""

    messages: list[tuple[Any, ...]] = field(default_factory=list)
    decisions: list[tuple[Any, ...]] = field(default_factory=list)
    shadows: list[tuple[Any, ...]] = field(default_factory=list)
    verdicts: list[tuple[Any, ...]] = field(default_factory=list)
    acks: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, row_id: int, message: Envelope, received_us: int) -> None:
        ts_us = _us(message.ts)
        key = (row_id, message.station, message.seq)
        self.messages.append(
            (*key, _stream_text(message.stream), _STREAM_KINDS[type(message)],
             str(message.msg_id), ts_us, message.model_dump_json(by_alias=True), received_us)
        )  # fmt: skip
        if isinstance(message, Decision):
            model = message.model
            self.decisions.append(
                (*key, message.part_id, ts_us, message.decided_by.value, message.action.value,
                 message.label, message.confidence,
                 message.review_reason.value if message.review_reason else None,
                 model.version if model else None, model.sha256 if model else None,
                 message.latency_ms)
            )  # fmt: skip
        elif isinstance(message, ShadowResult):
            active, candidate = message.active, message.candidate
            paired = active.label is not None and candidate.label is not None
            self.shadows.append(
                (*key, message.part_id, ts_us, int(paired), int(message.agree), active.label,
                 candidate.label, active.confidence, candidate.confidence, active.latency_ms,
                 candidate.latency_ms, active.model.version, active.model.sha256,
                 candidate.model.version, candidate.model.sha256, received_us)
            )  # fmt: skip
        elif isinstance(message, Verdict):
            self.verdicts.append(
                (*key, message.part_id, ts_us, message.operator, message.outcome.value,
                 message.label)
            )  # fmt: skip
        elif isinstance(message, CommandAck):
            self.acks.append(
                (*key, str(message.cmd_id), ts_us, message.command, int(message.ok),
                 message.error)
            )  # fmt: skip


# --- queries ---------------------------------------------------------------------------------

# A stage's rows: the candidate's results on its stations that this controller received
# since the stage began (received_us, never the station's ts). Both read only the
# shadows_candidate_received index.
_CANDIDATE_ROWS = """
FROM shadows s INDEXED BY shadows_candidate_received
WHERE s.candidate_sha256 = ? AND s.received_us >= ?
    AND s.station IN (SELECT value FROM json_each(?))
"""
_PAIRED_COUNTS = (
    "SELECT count(*), coalesce(sum(s.paired), 0), coalesce(sum(s.paired AND NOT s.agree), 0) "
    + _CANDIDATE_ROWS
)
_P95_LATENCY = (
    "SELECT s.candidate_latency_ms "
    + _CANDIDATE_ROWS
    + "ORDER BY s.candidate_latency_ms DESC LIMIT 1 OFFSET ?"
)
# Only disagreements (a few percent of the rows) look up a verdict. The latest pass or reject
# is the truth, so an escalation neither counts nor hides an earlier one (a supervisor's final
# verdict comes after it). The truth is the verdict's outcome, not its label: the station
# screen's words (ok/defect) need not be the model's (good/ng, ...); a reject is a defect.
_TRUTH = """(
        SELECT v.outcome = 'reject' FROM verdicts v INDEXED BY verdicts_station_part
        WHERE v.station = s.station AND v.part_id = s.part_id AND v.outcome IN ('pass', 'reject')
        ORDER BY v.id DESC LIMIT 1
    )"""
_STAGE_DISAGREEMENTS = """
    FROM shadows s INDEXED BY shadows_disagreements
    WHERE s.candidate_sha256 = ? AND s.received_us >= ?
        AND s.station IN (SELECT value FROM json_each(?)) AND s.paired = 1 AND s.agree = 0
"""
# MATERIALIZED: otherwise SQLite copies the lookup into each aggregate that names `defect`.
_LABELLED_COUNTS = (
    "WITH labelled AS MATERIALIZED (SELECT s.candidate_label = ? AS candidate_says_defect, "
    + _TRUTH + " AS defect " + _STAGE_DISAGREEMENTS + ")"
    + """
SELECT count(defect), coalesce(sum(defect = candidate_says_defect), 0),
    coalesce(sum(defect), 0), coalesce(sum(defect AND candidate_says_defect), 0)
FROM labelled
"""
)
# A stage's running totals (fleet_tally) are built from its disagreements one by one and its
# slowest latencies, then brought up to date with the rows stored since: a range of the rowid
# (NOT INDEXED keeps SQLite off the window's index), verdicts first.
_STAGE_DISPUTES = (
    "SELECT s.station, s.part_id, s.candidate_label = ?, " + _TRUTH + _STAGE_DISAGREEMENTS
)
_SLOWEST_LATENCIES = (
    "SELECT s.candidate_latency_ms "
    + _CANDIDATE_ROWS
    + "ORDER BY s.candidate_latency_ms DESC LIMIT ?"
)
_NEW_VERDICTS = (
    "SELECT v.station, v.part_id, v.outcome = 'reject' FROM verdicts v NOT INDEXED "
    "WHERE v.id > ? AND v.outcome IN ('pass', 'reject') ORDER BY v.id"
)
_NEW_STAGE_RESULTS = (
    "SELECT s.station, s.part_id, s.paired, s.agree, s.candidate_latency_ms, "  # noqa: S608
    "s.candidate_label = ?, CASE WHEN s.paired = 1 AND s.agree = 0 THEN " + _TRUTH + " END "
    "FROM shadows s NOT INDEXED WHERE s.id > ? AND s.candidate_sha256 = ? "
    "AND s.received_us >= ? AND s.station IN (SELECT value FROM json_each(?)) ORDER BY s.id"
)
# The plots' series are dated by the stations' clocks.
_DECISION_SERIES = (
    "SELECT d.ts_us / ? AS bucket, d.action, count(*) "
    "FROM decisions d INDEXED BY decisions_station_ts "
    "WHERE d.ts_us >= ? AND d.ts_us < ? AND d.station IN (SELECT value FROM json_each(?)) "
    "GROUP BY bucket, d.action"
)
_SHADOW_SERIES = (
    "SELECT s.ts_us / ? AS bucket, count(*), coalesce(sum(s.agree), 0) "
    "FROM shadows s INDEXED BY shadows_ts "
    "WHERE s.ts_us >= ? AND s.ts_us < ? AND s.station IN (SELECT value FROM json_each(?)) "
    "AND s.paired = 1 GROUP BY bucket"
)
_CANDIDATE_SERIES = _SHADOW_SERIES.replace(
    "GROUP BY bucket", "AND s.candidate_sha256 = ? GROUP BY bucket"
)
# The same, of the rows stored after a row id only (a series' running totals).
_NEW_DECISION_SERIES = _DECISION_SERIES.replace(
    "INDEXED BY decisions_station_ts WHERE", "NOT INDEXED WHERE d.id > ? AND"
)
_NEW_SHADOW_SERIES = _SHADOW_SERIES.replace(
    "INDEXED BY shadows_ts WHERE", "NOT INDEXED WHERE s.id > ? AND"
)
_NEW_CANDIDATE_SERIES = _CANDIDATE_SERIES.replace(
    "INDEXED BY shadows_ts WHERE", "NOT INDEXED WHERE s.id > ? AND"
)
_LAST_ID = "SELECT coalesce(max(id), 0) FROM messages"
_CATCH_UP_MAX_ROWS = 200_000
"""Rows stored since running totals were last brought up to date beyond which rebuilding them
(a read of their window's index) is the cheaper way."""
_TALLIES_KEPT = 8
_SERIES_AHEAD_S = 86_400
"""A series' running totals cover the buckets a day past the window they were built for, so a
dashboard's moving window rebuilds them once a day, and keep those a day before it."""
_SELECT_DECISION_PAYLOADS = "SELECT m.payload FROM decisions d JOIN messages m USING (id) "
# A late QoS 0 report never replaces a newer one as "latest", but joins the history. One dated
# after the controller's clock at its arrival (?4: a station clock set ahead for a while, then
# put right) is no measure of newer: it would hide every later report.
_SET_LATEST_METRICS = """
INSERT INTO stations (station, metrics_json, metrics_ts_us, metrics_count) VALUES (?1, ?2, ?3, 1)
ON CONFLICT (station) DO UPDATE SET
    metrics_json = CASE WHEN coalesce(metrics_ts_us, -1) <= excluded.metrics_ts_us
        OR metrics_ts_us > ?4 THEN excluded.metrics_json ELSE metrics_json END,
    metrics_ts_us = CASE WHEN coalesce(metrics_ts_us, -1) <= excluded.metrics_ts_us
        OR metrics_ts_us > ?4 THEN excluded.metrics_ts_us ELSE metrics_ts_us END,
    metrics_count = metrics_count + 1
RETURNING metrics_count
"""


def _stage_evidence(
    parts: int, disagreements: int, labelled: tuple[int, int, int, int], p95: float | None
) -> StageEvidence:
    """A stage's evidence from its counts; `labelled` is (labelled disagreements, candidate
    right, labelled defects, candidate right on a defect)."""
    labelled_count, candidate_right, labelled_defect, defect_right = labelled
    unlabelled = disagreements - labelled_count
    estimated_defects = (
        labelled_defect + round(unlabelled * labelled_defect / labelled_count)
        if labelled_count
        else 0
    )
    return StageEvidence(
        overall=PairedEvidence(
            parts=parts,
            disagreements=disagreements,
            labelled_disagreements=labelled_count,
            candidate_right=candidate_right,
        ),
        escapes=PairedEvidence(
            parts=parts,
            disagreements=estimated_defects,
            labelled_disagreements=labelled_defect,
            candidate_right=defect_right,
        ),
        p95_latency_ms=p95,
        possible_escapes=labelled_defect + unlabelled,
    )


def paired_evidence_by_query(
    conn: sqlite3.Connection, names: str, since_us: int, candidate_sha256: str,
    defect_label: str,
) -> StageEvidence:
    """A stage's evidence read from every row of its window (what the running totals must
    equal; `names` as `_stations_param` gives them). Call it inside a snapshot."""
    rows = (candidate_sha256, since_us, names)
    results, parts, disagreements = (
        int(value) for value in conn.execute(_PAIRED_COUNTS, rows).fetchone()
    )
    counted, right, defect, defect_right = (
        int(value) for value in conn.execute(_LABELLED_COUNTS, (defect_label, *rows)).fetchone()
    )
    p95: float | None = None
    if results:
        # Nearest rank, counted from the top: the sorter keeps only the slowest 5%.
        from_top = results - math.ceil(0.95 * results)
        p95 = float(conn.execute(_P95_LATENCY, (*rows, from_top)).fetchone()[0])
    return _stage_evidence(parts, disagreements, (counted, right, defect, defect_right), p95)


_StageKey = tuple[str, int, str, str]
"""(stations as _stations_param gives them, since_us, candidate_sha256, defect_label)."""


@dataclass(slots=True)
class _StageTally:
    """A stage's evidence as running totals, counted up to message id `upto`."""

    generation: int
    upto: int
    parts: int
    disagreements: int
    slowest: SlowestLatencies
    disputes: Disputes

    def evidence(self) -> StageEvidence:
        d = self.disputes
        labelled = (d.labelled, d.candidate_right, d.labelled_defect, d.defect_right)
        return _stage_evidence(self.parts, self.disagreements, labelled, self.slowest.p95())


def _slowest_latencies(conn: sqlite3.Connection, key: _StageKey, results: int) -> SlowestLatencies:
    names, since_us, candidate, _ = key
    wanted = SlowestLatencies.wanted(results)
    values = [
        float(value)
        for (value,) in conn.execute(_SLOWEST_LATENCIES, (candidate, since_us, names, wanted))
    ]
    return SlowestLatencies(values, results, complete=len(values) == results)


def _build_stage_tally(
    conn: sqlite3.Connection, key: _StageKey, generation: int, upto: int
) -> _StageTally:
    """A stage's running totals from every row of its window, as of message id `upto`."""
    names, since_us, candidate, defect_label = key
    results, parts, disagreements = (
        int(value) for value in conn.execute(_PAIRED_COUNTS, (candidate, since_us, names))
        .fetchone()
    )
    disputes = Disputes()
    for station, part_id, says_defect, defect in conn.execute(
        _STAGE_DISPUTES, (defect_label, candidate, since_us, names)
    ):
        disputes.add((station, part_id), bool(says_defect), _truth(defect))
    return _StageTally(generation, upto, parts, disagreements,
                       _slowest_latencies(conn, key, results), disputes)  # fmt: skip


def _catch_up_stage_tally(
    conn: sqlite3.Connection, tally: _StageTally, key: _StageKey, upto: int
) -> None:
    """Count the rows stored after `tally.upto` up to `upto` (the last id of the snapshot):
    first the verdicts on parts it already holds, then the stage's new results."""
    names, since_us, candidate, defect_label = key
    for station, part_id, defect in conn.execute(_NEW_VERDICTS, (tally.upto,)):
        tally.disputes.label((station, part_id), bool(defect))
    for station, part_id, paired, agree, latency, says_defect, defect in conn.execute(
        _NEW_STAGE_RESULTS, (defect_label, tally.upto, candidate, since_us, names)
    ):
        tally.slowest.add(float(latency))
        if paired:
            tally.parts += 1
            if not agree:
                tally.disagreements += 1
                tally.disputes.add((station, part_id), bool(says_defect), _truth(defect))
    if tally.slowest.needs_refill:
        tally.slowest = _slowest_latencies(conn, key, tally.slowest.results)
    tally.upto = upto


def _truth(defect: int | None) -> bool | None:
    return None if defect is None else bool(defect)


_SeriesKey = tuple[str, int, str | None]
"""(stations as _stations_param gives them, bucket width in us, candidate_sha256 or None)."""


@dataclass(slots=True)
class _SeriesTally:
    """A series' counts per bucket, complete for buckets `first` to `last` (both included)
    as of message id `upto`."""

    generation: int
    upto: int
    first: int
    last: int
    counts: SeriesCounts


def series_counts_by_query(
    conn: sqlite3.Connection, key: _SeriesKey, since_us: int, until_us: int,
    after_id: int | None = None,
) -> SeriesCounts:
    """The series' counts per bucket of what is dated from `since_us` up to `until_us`, read
    from every row of that window; with `after_id`, of the rows stored after it only."""
    names, width_us, candidate = key
    counts = SeriesCounts()
    window = (since_us, until_us, names)
    if after_id is None:
        decisions = conn.execute(_DECISION_SERIES, (width_us, *window))
        shadows = (conn.execute(_SHADOW_SERIES, (width_us, *window)) if candidate is None
                   else conn.execute(_CANDIDATE_SERIES, (width_us, *window, candidate)))
    else:
        decisions = conn.execute(_NEW_DECISION_SERIES, (width_us, after_id, *window))
        shadows = (
            conn.execute(_NEW_SHADOW_SERIES, (width_us, after_id, *window)) if candidate is None
            else conn.execute(_NEW_CANDIDATE_SERIES, (width_us, after_id, *window, candidate))
        )  # fmt: skip
    for bucket, action, count in decisions:
        counts.add_actions(int(bucket), str(action), int(count))
    for bucket, count, agreed in shadows:
        counts.add_pairs(int(bucket), int(count), int(agreed))
    return counts


def _series_points(counts: SeriesCounts, width_us: int) -> list[SeriesPoint]:
    """Points from the first to the last bucket with any data, zero-filled in between."""
    busy = counts.actions.keys() | counts.pairs.keys()
    if not busy:
        return []
    points = []
    for bucket in range(min(busy), max(busy) + 1):
        by_action = dict(sorted(counts.actions.get(bucket, {}).items()))
        shadow_pairs, agreements = counts.pairs.get(bucket, (0, 0))
        points.append(
            SeriesPoint(
                start=_dt(bucket * width_us),
                parts=sum(by_action.values()),
                actions=by_action,
                shadow_pairs=shadow_pairs,
                agreements=agreements,
                agreement_rate=agreements / shadow_pairs if shadow_pairs else None,
            )
        )
    return points


def offline_state(previous: StationState | None, offline: StationState) -> StationState:
    """What to keep when a station is reported offline. Its Last Will was composed when it
    connected: when the state stored is from the same seq stream and at least as new (a state
    published since, after a promote say), that one's models, mode and faults stay, marked
    offline; else the offline report is all there is."""
    if previous is None or previous.stream != offline.stream or previous.seq < offline.seq:
        return offline
    return previous.model_copy(update={"online": False})


class SqliteFleetStore:
    """`FleetStore` on one SQLite file (WAL); safe to share between threads.

    Every thread gets its own connection, so the dashboard's reads never wait for the ingest
    thread, and every write is one short `BEGIN IMMEDIATE` transaction. Commits use
    synchronous=NORMAL: the stations keep every message until it is receipted, and receipts go
    out only after the commit returns (docs/decisions/0005-fleet-store.md). Call `close()` once
    the threads using the store have stopped.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq_lock = threading.Lock()
        self._seq_next = 0
        self._seq_limit = 0  # exclusive end of the block reserved on disk
        self._logged_unreadable: set[tuple[str, str]] = set()  # (station, document) logged
        self._reused = _ReuseLog()
        self._busy_timeout_s = busy_timeout_s
        self._waiting = _WaitingWriters()
        # Running totals of the evidence and the series: valid while no row they counted was
        # deleted, which only `prune` does; each of its deletes moves the generation on.
        self._tally_lock = threading.Lock()
        self._generations = itertools.count()
        self._generation = next(self._generations)
        self._stage_tallies: OrderedDict[_StageKey, _StageTally] = OrderedDict()
        self._series_tallies: OrderedDict[_SeriesKey, _SeriesTally] = OrderedDict()
        self._db = SqliteDatabase(
            self.path, synchronous="NORMAL", busy_timeout_s=busy_timeout_s,
            # The shadow table of a running stage is read every second: keep it in memory.
            # A backup's read holds checkpoints back, so the WAL grows by what is stored
            # during the copy (GBs at a plant's rate); the limit shrinks it back once the
            # checkpoints catch up, to twice the 16 MB between checkpoints.
            pragmas=("cache_size=-65536", "temp_store=MEMORY", "wal_autocheckpoint=4000",
                     f"journal_size_limit={_WAL_LIMIT_BYTES}"),
            error=FleetStoreError,
        )
        self._db.migrate(_MIGRATIONS)

    # -- connections and transactions (linesight.sqlite_db) --

    def _conn(self) -> sqlite3.Connection:
        return self._db.connection()

    @contextlib.contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; `durable=True` fsyncs it (for what no station can resend).
        While it waits for the write lock it counts as waiting (see `prune`)."""
        with contextlib.ExitStack() as stack:
            with self._waiting:
                conn = stack.enter_context(
                    self._db.write(synchronous="FULL" if durable else None)
                )
            yield conn

    def _snapshot(self) -> Transaction:
        return self._db.snapshot()

    def schema_version(self) -> int:
        return self._db.schema_version()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteFleetStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- ingest --

    def ingest(
        self, messages: Sequence[Envelope], received: datetime | None = None
    ) -> dict[StreamKey, int]:
        """Store a batch in one transaction; return each seq stream's highest contiguous seq.

        Decisions, shadow results, verdicts and acks are keyed by `(station, stream, seq)`: a
        duplicate (the same msg_id) collapses onto the first copy. A message under a seq that
        holds another msg_id is stored beside it and logged: that station gave out the seq
        again (its store was restored from a backup), and its next receipt deletes it there.
        The result names every stream with one of those in the batch, -1 while its seq 0 is
        missing. Metrics are kept (latest plus a ring of METRICS_HISTORY) and states go to the
        inventory as if received now; neither is part of a seq stream, so a batch of only those
        returns {}. Retention counts from `received` (default now), never from the station's
        `ts`: its clock may be behind.
        """
        self._reused.flush(time.monotonic())  # what the last warning's minute still holds
        batch: dict[_MessageKey, Envelope] = {}
        metrics: list[StationMetrics] = []
        states: list[StationState] = []
        for message in messages:
            if isinstance(message, StationMetrics):
                metrics.append(message)
            elif isinstance(message, StationState):
                states.append(message)
            elif type(message) in _STREAM_KINDS:
                key = (message.station, _stream_text(message.stream), message.seq,
                       str(message.msg_id))  # fmt: skip
                batch.setdefault(key, message)
            else:
                raise ValueError(f"ingest: {type(message).__name__} is not a station message")
        # Durable: the receipts sent after this commit let stations delete their copies, so a
        # power cut must not take the commit back (one fsync per batch of up to 1,000).
        with self._write(durable=True) as conn:
            received_us = _us(received or datetime.now(UTC))
            contiguous = self._ingest_stream(conn, batch, received_us) if batch else {}
            if metrics:
                self._ingest_metrics(conn, metrics, received_us)
            if states:
                now_us = _us(datetime.now(UTC))
                for state in states:
                    self._record_state(conn, state, now_us)
        return {_stream_key(*key): mark for key, mark in contiguous.items()}

    def _ingest_stream(
        self, conn: sqlite3.Connection, batch: dict[_MessageKey, Envelope], received_us: int
    ) -> dict[tuple[str, str], int]:
        names = sorted({(station, stream) for station, stream, _, _ in batch})
        marks: dict[tuple[str, str], tuple[int, int]] = {name: (-1, -1) for name in names}
        for station, stream, watermark, max_seq in conn.execute(
            "SELECT s.station, s.stream, s.watermark, s.max_seq FROM json_each(?) AS j "
            "JOIN streams s ON s.station = j.value ->> 0 AND s.stream = j.value ->> 1",
            (json.dumps(names),),
        ):
            marks[(station, stream)] = (watermark, max_seq)
        for station, stream in (name for name in names if marks[name] == (-1, -1)):
            _note_new_stream(conn, station, stream)
        # At or below the watermark a seq is stored; above max_seq it is not; only the gaps in
        # between need a look at the table. In the steady state nothing does.
        taken: set[tuple[str, str, int]] = set()  # seqs that already hold a message
        maybe_stored = sorted({key[:3] for key in batch if key[2] <= marks[key[:2]][1]})
        if maybe_stored:
            for station, stream, seq, msg_id in conn.execute(
                "SELECT m.station, m.stream, m.seq, m.msg_id FROM json_each(?) AS j "
                "JOIN messages m ON m.station = j.value ->> 0 AND m.stream = j.value ->> 1 "
                "AND m.seq = j.value ->> 2",
                (json.dumps(maybe_stored),),
            ):
                taken.add((station, stream, seq))
                batch.pop((station, stream, seq, msg_id), None)  # a copy of a stored one
        # At or below the watermark a seq was stored, even if it has since been pruned by age:
        # a late copy of it is a duplicate, never stored again.
        for key in [k for k in batch if k[2] <= marks[k[:2]][0] and k[:3] not in taken]:
            del batch[key]
        self._note_reused(batch, taken)
        rows = _Rows()
        fresh: dict[tuple[str, str], set[int]] = {}
        # Ids are handed out here, under the write lock, so each kind's row shares its message's.
        row_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])
        for (station, stream, seq, _), message in batch.items():
            row_id += 1
            rows.add(row_id, message, received_us)
            fresh.setdefault((station, stream), set()).add(seq)
        conn.executemany(_INSERT_MESSAGE, rows.messages)
        for statement, params in (
            (_INSERT_DECISION, rows.decisions),
            (_INSERT_SHADOW, rows.shadows),
            (_INSERT_VERDICT, rows.verdicts),
            (_INSERT_ACK, rows.acks),
        ):
            if params:
                conn.executemany(statement, params)

        updates: list[tuple[str, str, int, int]] = []
        for name, seqs in fresh.items():
            watermark, max_seq = marks[name]
            new_mark = self._advance(conn, name, watermark, max_seq, seqs)
            updates.append((*name, new_mark, max(max_seq, max(seqs))))
            marks[name] = (new_mark, max(max_seq, max(seqs)))
        conn.executemany(_SET_STREAM_MARKS, updates)
        conn.executemany(_ADD_STATION, [(station,) for station in {s for s, _ in fresh}])
        return {name: marks[name][0] for name in names}

    def _note_reused(
        self, batch: dict[_MessageKey, Envelope], taken: set[tuple[str, str, int]]
    ) -> None:
        """Log the seqs of `batch` (all new messages) that another message holds, in this
        store or earlier in the batch."""
        reused: dict[tuple[str, str], list[int]] = {}
        seen: set[tuple[str, str, int]] = set()
        for key in sorted(batch, key=lambda k: k[:3]):
            if key[:3] in taken or key[:3] in seen:
                reused.setdefault(key[:2], []).append(key[2])
            seen.add(key[:3])
        for (station, stream), seqs in reused.items():
            self._reused.add(station, stream, seqs, time.monotonic())

    @staticmethod
    def _advance(
        conn: sqlite3.Connection, name: tuple[str, str], watermark: int, max_seq: int,
        fresh: set[int],
    ) -> int:
        """The stream's new watermark after `fresh` seqs were stored; O(seqs it moves past)."""
        # Invariant: watermark + 1 is never stored, so only a fresh watermark + 1 moves it.
        mark = watermark
        while mark + 1 in fresh:
            mark += 1
        if mark == watermark:
            return mark
        return SqliteFleetStore._run_from(conn, name, mark, max_seq)

    @staticmethod
    def _run_from(conn: sqlite3.Connection, name: tuple[str, str], mark: int, max_seq: int) -> int:
        """The end of the run of stored seqs that continues from `mark` (itself covered)."""
        if max_seq <= mark:
            return mark
        # Seqs stored by earlier batches above the old gap may continue the run.
        if (
            conn.execute(
                "SELECT 1 FROM messages WHERE station = ? AND stream = ? AND seq = ?",
                (*name, mark + 1),
            ).fetchone()
            is None
        ):
            return mark
        # With mark + 1 stored, the first stored seq above mark whose successor is missing
        # ends the run: every seq between was stored, or that one would have been found first.
        end = conn.execute(
            "SELECT m.seq FROM messages m WHERE m.station = ? AND m.stream = ? AND m.seq > ? "
            "AND NOT EXISTS (SELECT 1 FROM messages n WHERE n.station = m.station "
            "AND n.stream = m.stream AND n.seq = m.seq + 1) ORDER BY m.seq LIMIT 1",
            (*name, mark),
        ).fetchone()
        return int(end[0])

    def resume(self, key: StreamKey, receipted_upto: int) -> int | None:
        """Raise the stream's watermark to `receipted_upto`, what the station says a controller
        receipted and it deleted: those messages will never come again, so waiting for them
        would stop the stream's receipts for good. That happens only when this store lost
        messages it had receipted (restored from a backup, or replaced). Returns the new
        watermark when it moved (past later seqs already stored, too), else None."""
        # Every state a station publishes says this; it is news only after a loss, so the
        # common case is one read, without the write lock.
        if receipted_upto < 0 or receipted_upto <= self.contiguous(*key):
            return None
        name = (key.station, _stream_text(key.stream))
        with self._write() as conn:
            row = conn.execute(
                "SELECT watermark, max_seq FROM streams WHERE station = ? AND stream = ?", name
            ).fetchone()
            watermark, max_seq = (-1, -1) if row is None else (int(row[0]), int(row[1]))
            if receipted_upto <= watermark:
                return None
            mark = self._run_from(conn, name, receipted_upto, max_seq)
            conn.execute(_SET_STREAM_MARKS, (*name, mark, max(max_seq, mark)))
            conn.execute(_ADD_STATION, (key.station,))
        log.warning(
            "station %s, seq stream %r: seqs %d to %d were receipted earlier but are not in "
            "this store (was it restored or replaced?); the stream continues from %d",
            key.station, name[1], watermark + 1, receipted_upto, mark,
        )  # fmt: skip
        return mark

    def prune(self, before: datetime, batch: int = 5000) -> int:
        """Delete stored messages received before `before` that lie at or below their stream's
        watermark (so every one of them was receipted), a batch per short transaction.

        An hour of a plant's messages is a million rows: between two batches, writers of this
        process waiting for the write lock (the ingest, a rollout's save) go first, or the
        prune would take it back each time before their next try and hold them past their busy
        timeout. Each batch reads on from where the last stopped, in order of arrival, so the
        old rows that stay (above a gap in their stream) are read once, not by every batch."""
        if batch < 1:
            raise ValueError(f"batch: must be at least 1, got {batch}")
        cutoff = _us(before)
        after = (-(2**63), -(2**63))  # (received_us, id) of the last row read
        total = 0
        while True:
            with self._write() as conn:
                rows = _prune_batch(conn, cutoff, after, batch)
                ids = [row_id for row_id, _, receipted in rows if receipted]
                if ids:
                    chosen = json.dumps(ids)
                    for statement in _PRUNE:
                        conn.execute(statement, (chosen,))
            if ids:  # after the commit: a tally built before it was built on the rows deleted
                self._generation = next(self._generations)
            total += len(ids)
            if len(rows) < batch:
                return total
            after = (rows[-1][1], rows[-1][0])
            self._waiting.wait_for_none(self._busy_timeout_s)

    def _ingest_metrics(
        self, conn: sqlite3.Connection, reports: list[StationMetrics], received_us: int
    ) -> None:
        for report in reports:
            ts_us = _us(report.ts)
            payload = report.model_dump_json(by_alias=True)
            count = conn.execute(
                _SET_LATEST_METRICS,
                (report.station, payload, ts_us, received_us),
            ).fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO metrics_history (station, slot, ts_us, payload) "
                "VALUES (?, ?, ?, ?)",
                (report.station, (int(count) - 1) % METRICS_HISTORY, ts_us, payload),
            )

    def contiguous(self, station: str, stream: uuid.UUID | None = None) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT watermark FROM streams WHERE station = ? AND stream = ?",
                (station, _stream_text(stream)),
            )
            .fetchone()
        )
        return -1 if row is None else int(row[0])

    # -- inventory --

    def record_state(self, state: StationState, received_at: datetime) -> None:
        """Keep the station's retained state (or Last Will); the latest call wins.

        Arrival order, not seq, decides: a Last Will is composed at connect time, so its seq is
        older than the online states published after it.
        """
        received_us = _us(received_at)
        with self._write() as conn:
            self._record_state(conn, state, received_us)

    @staticmethod
    def _record_state(conn: sqlite3.Connection, state: StationState, received_us: int) -> None:
        if not state.online:
            row = conn.execute(
                "SELECT state_json FROM stations WHERE station = ?", (state.station,)
            ).fetchone()
            previous = None
            if row is not None and row[0]:
                with contextlib.suppress(ValueError):  # a row an older controller wrote
                    previous = StationState.model_validate_json(row[0])
            state = offline_state(previous, state)
        last_seen = received_us if state.online else None
        conn.execute(
            "INSERT INTO stations (station, online, state_json, labels_json, last_seen_us) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (station) DO UPDATE SET "
            "online = excluded.online, state_json = excluded.state_json, "
            "labels_json = excluded.labels_json, "
            "last_seen_us = coalesce(excluded.last_seen_us, last_seen_us)",
            (
                state.station,
                int(state.online),
                state.model_dump_json(by_alias=True),
                json.dumps(state.labels),
                last_seen,
            ),
        )

    def stations(self) -> list[StationRecord]:
        """Every station heard of (by state, stream or metrics), sorted by id.

        A row stored by an older controller may no longer validate (an infinite number it
        wrote out as null). A station whose state cannot be read is left out until it sends a
        new one: nothing can be said of its faults. One whose latest metrics report cannot be
        read is listed without it until the next report. Either is logged once per station.
        """
        rows = (
            self._conn()
            .execute(
                "SELECT station, online, state_json, labels_json, last_seen_us, metrics_json "
                "FROM stations ORDER BY station"
            )
            .fetchall()
        )
        records: list[StationRecord] = []
        for station, online, state_json, labels_json, last_seen_us, metrics_json in rows:
            try:
                state = StationState.model_validate_json(state_json) if state_json else None
                labels = json.loads(labels_json)
            except ValueError as exc:  # pydantic's ValidationError is one
                self._unreadable(station, "state", "left out of the inventory", exc)
                continue
            try:
                metrics = (
                    StationMetrics.model_validate_json(metrics_json) if metrics_json else None
                )
            except ValueError as exc:
                self._unreadable(station, "latest metrics", "listed without metrics", exc)
                metrics = None
            records.append(StationRecord(
                station=station,
                online=bool(online),
                state=state,
                last_seen=None if last_seen_us is None else _dt(last_seen_us),
                labels=labels,
                latest_metrics=metrics,
            ))
        return records

    def _unreadable(self, station: str, what: str, outcome: str, exc: ValueError) -> None:
        """Log, once per station and document, one that no longer validates."""
        if (station, what) in self._logged_unreadable:
            return
        self._logged_unreadable.add((station, what))
        log.warning("station %s: its stored %s cannot be read; it is %s until the station "
                    "reports again: %s", station, what, outcome, exc)

    def metrics_history(self, station: str, since: datetime | None = None) -> list[StationMetrics]:
        """The station's kept metrics reports (at most METRICS_HISTORY), oldest first."""
        rows = (
            self._conn()
            .execute(
                "SELECT payload FROM metrics_history WHERE station = ? AND ts_us >= ? "
                "ORDER BY ts_us",
                (station, -(2**62) if since is None else _us(since)),
            )
            .fetchall()
        )
        history: list[StationMetrics] = []
        for (payload,) in rows:
            try:
                history.append(StationMetrics.model_validate_json(payload))
            except ValueError:  # pydantic's ValidationError: stored before a rule it breaks
                continue
        return history

    def parts_missed_reports(self, seen: Mapping[str, int]) -> dict[str, MissedReports]:
        """For each station with metrics reports past `seen[station]` (the count of its reports
        already read; absent: none), the parts missed of those reports. Reads the new reports'
        slots of its ring (an index range), or the whole ring (at most METRICS_HISTORY rows)."""
        found: dict[str, MissedReports] = {}
        with self._snapshot() as conn:
            counts = conn.execute(
                "SELECT station, metrics_count FROM stations WHERE metrics_count > 0"
            ).fetchall()
            for station, count in counts:
                after = seen.get(station, 0)
                if count == after:
                    continue
                whole = after <= 0 or not 0 < count - after < METRICS_HISTORY
                ranges = [(0, METRICS_HISTORY - 1)] if whole else _ring_slots(after, count)
                rows = [
                    row
                    for first, last in ranges
                    for row in conn.execute(
                        "SELECT ts_us, json_extract(payload, '$.parts_missed') "
                        "FROM metrics_history WHERE station = ? AND slot BETWEEN ? AND ?",
                        (station, first, last),
                    )
                ]
                found[station] = MissedReports(count=count, whole=whole, reports=[
                    (_dt(ts_us), missed if isinstance(missed, int) and missed >= 0 else None)
                    for ts_us, missed in rows
                ])
        return found

    # -- evidence --

    def paired_evidence(
        self,
        stations: Sequence[str],
        since: datetime,
        candidate_sha256: str,
        defect_label: str = "defect",
    ) -> StageEvidence:
        """Paired outcomes of `candidate_sha256` against the active model on `stations`, of
        the results this controller received at or after `since` (the stage's start, on this
        controller's clock); the station's own `ts` plays no part, as its clock may be off.

        A disagreement's truth is its latest pass (not a defect) or reject (a defect, whose
        label is `defect_label` for the candidate). `escapes.disagreements` estimates the defect
        disagreements among all of them: the labelled ones whose truth is the defect, plus the
        unlabelled ones in the same proportion; `possible_escapes` counts every unlabelled one
        as a possible defect, the bound the rare-event pass may rely on.

        Kept as running totals per stage: a call reads only the rows stored since the last one
        (decision 0016), and answers exactly what `paired_evidence_by_query` reads from the
        whole window.
        """
        key = (_stations_param(stations), _us(since), candidate_sha256, defect_label)
        with self._tally_lock:
            generation = self._generation  # read before the snapshot begins
            with self._snapshot() as conn:
                upto = int(conn.execute(_LAST_ID).fetchone()[0])
                tally = self._stage_tallies.get(key)
                if (tally is None or tally.generation != generation
                        or upto - tally.upto > _CATCH_UP_MAX_ROWS):  # fmt: skip
                    tally = _build_stage_tally(conn, key, generation, upto)
                else:
                    _catch_up_stage_tally(conn, tally, key, upto)
            _remember(self._stage_tallies, key, tally)
            return tally.evidence()

    def evidence_series(
        self,
        stations: Sequence[str],
        since: datetime,
        bucket_s: int,
        candidate_sha256: str | None = None,
        until: datetime | None = None,
    ) -> list[SeriesPoint]:
        """Per bucket of `bucket_s` seconds (aligned to the epoch), oldest first, of what is
        dated from `since` up to `until` (by default one bucket past now).

        Buckets run from the first to the last with any data, zero-filled in between. Messages
        dated after `until` (a station whose clock runs ahead) are left out: the series never
        holds more than the window's buckets, however far ahead such a date lies.

        The window's whole buckets come from running totals brought up to date with the rows
        stored since the last call, the partial ones at its ends from the rows (decision 0016).
        """
        if bucket_s < 1:
            raise ValueError(f"bucket_s: must be at least 1, got {bucket_s}")
        if until is None:
            until = datetime.now(UTC) + timedelta(seconds=bucket_s)
        key = (_stations_param(stations), bucket_s * 1_000_000, candidate_sha256)
        since_us, until_us = _us(since), _us(until)
        width_us = key[1]
        # Whole buckets come from running totals, the partial ones at either end from the rows.
        first, last = -(-since_us // width_us), until_us // width_us - 1
        if since_us < 0 or first > last:  # SQLite rounds a negative bucket towards zero
            with self._snapshot() as conn:
                return _series_points(
                    series_counts_by_query(conn, key, since_us, until_us), width_us
                )
        counts = SeriesCounts()
        with self._tally_lock:
            generation = self._generation  # read before the snapshot begins
            with self._snapshot() as conn:
                tally = self._series_tally(conn, key, generation, first, last)
                counts.add_range(tally.counts, first, last)
                if since_us < first * width_us:
                    counts.add(series_counts_by_query(conn, key, since_us, first * width_us))
                if (last + 1) * width_us < until_us:
                    counts.add(series_counts_by_query(conn, key, (last + 1) * width_us, until_us))
            _remember(self._series_tallies, key, tally)
        return _series_points(counts, width_us)

    def _series_tally(
        self, conn: sqlite3.Connection, key: _SeriesKey, generation: int, first: int, last: int
    ) -> _SeriesTally:
        """The series' running totals, brought up to date, covering buckets `first` to
        `last`; rebuilt when they cannot be."""
        width_us = key[1]
        ahead = max(1, _SERIES_AHEAD_S * 1_000_000 // width_us)
        upto = int(conn.execute(_LAST_ID).fetchone()[0])
        tally = self._series_tallies.get(key)
        if (tally is None or tally.generation != generation
                or upto - tally.upto > _CATCH_UP_MAX_ROWS
                or first < tally.first or last > tally.last):  # fmt: skip
            counts = series_counts_by_query(conn, key, first * width_us,
                                            (last + ahead + 1) * width_us)  # fmt: skip
            return _SeriesTally(generation, upto, first, last + ahead, counts)
        tally.counts.add(series_counts_by_query(
            conn, key, tally.first * width_us, (tally.last + 1) * width_us, after_id=tally.upto
        ))
        tally.upto = upto
        if first - tally.first > ahead:
            tally.counts.drop_before(first)
            tally.first = first
        return tally

    def decision_counts(self, since: datetime) -> dict[str, dict[str, int]]:
        """station -> action -> decisions since `since`."""
        counts: dict[str, dict[str, int]] = {}
        # A range of decisions_station_ts per station: left to itself, SQLite reads the whole
        # index (every decision kept, however few are recent) to spare a sort.
        for station, action, count in self._conn().execute(
            "SELECT s.station, d.action, count(*) FROM stations s "
            "JOIN decisions d INDEXED BY decisions_station_ts "
            "ON d.station = s.station AND d.ts_us >= ? GROUP BY s.station, d.action",
            (_us(since),),
        ):
            counts.setdefault(str(station), {})[str(action)] = int(count)
        return counts

    def ack(self, cmd_id: str) -> CommandAck | None:
        """The latest ack of a command, or None while none arrived."""
        row = (
            self._conn()
            .execute(
                "SELECT m.payload FROM acks a JOIN messages m USING (id) "
                "WHERE a.cmd_id = ? ORDER BY a.id DESC LIMIT 1",
                (str(cmd_id),),
            )
            .fetchone()
        )
        return None if row is None else CommandAck.model_validate_json(row[0])

    def decisions(
        self,
        station: str | None = None,
        since: datetime | None = None,
        limit: int = 100_000,
    ) -> list[Decision]:
        """Stored decisions, oldest first, at most `limit`."""
        if limit < 1:
            raise ValueError(f"limit: must be at least 1, got {limit}")
        since_us = -(2**62) if since is None else _us(since)
        if station is None:
            sql = _SELECT_DECISION_PAYLOADS + "WHERE d.ts_us >= ? "
            params: tuple[Any, ...] = (since_us, limit)
        else:
            sql = _SELECT_DECISION_PAYLOADS + "WHERE d.station = ? AND d.ts_us >= ? "
            params = (station, since_us, limit)
        rows = (
            self._conn()
            .execute(sql + "ORDER BY d.ts_us, d.station, d.seq LIMIT ?", params)
            .fetchall()
        )
        return [Decision.model_validate_json(payload) for (payload,) in rows]

    # -- rollouts --

    def save_rollout(
        self,
        rollout_id: str,
        phase: str,
        state_json: str,
        updated: datetime,
        defect_label: str | None = None,
    ) -> None:
        """Write a rollout's state; fsynced, because no station holds a copy to resend.

        `defect_label` is the label the rollout's candidate calls a defect (given when the
        rollout starts); None keeps the one saved before.
        """
        updated_us = _us(updated)
        with self._write(durable=True) as conn:
            conn.execute(
                "INSERT INTO rollouts (rollout_id, phase, state_json, updated_us, defect_label) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (rollout_id) DO UPDATE SET "
                "phase = excluded.phase, state_json = excluded.state_json, "
                "updated_us = excluded.updated_us, "
                "defect_label = coalesce(excluded.defect_label, defect_label)",
                (rollout_id, phase, state_json, updated_us, defect_label),
            )

    def rollout(self, rollout_id: str) -> str | None:
        row = (
            self._conn()
            .execute("SELECT state_json FROM rollouts WHERE rollout_id = ?", (rollout_id,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def rollout_defect_label(self, rollout_id: str) -> str | None:
        """The defect label saved with the rollout; None if it has none (or is unknown)."""
        row = (
            self._conn()
            .execute("SELECT defect_label FROM rollouts WHERE rollout_id = ?", (rollout_id,))
            .fetchone()
        )
        return None if row is None or row[0] is None else str(row[0])

    def active_rollout(self) -> tuple[str, str] | None:
        """(rollout_id, state_json) of the rollout not yet in a terminal phase, if any."""
        row = (
            self._conn()
            .execute(
                "SELECT rollout_id, state_json FROM rollouts "
                "WHERE phase NOT IN (SELECT value FROM json_each(?)) "
                "ORDER BY updated_us DESC LIMIT 1",
                (_TERMINAL_PHASES,),
            )
            .fetchone()
        )
        return None if row is None else (str(row[0]), str(row[1]))

    def latest_rollout(self) -> tuple[str, str] | None:
        """(rollout_id, state_json) of the rollout changed last, whatever its phase: the first
        of `rollouts()`."""
        row = (
            self._conn()
            .execute(
                "SELECT rollout_id, state_json FROM rollouts "
                "ORDER BY updated_us DESC, rollout_id LIMIT 1"
            )
            .fetchone()
        )
        return None if row is None else (str(row[0]), str(row[1]))

    def rollouts(self, limit: int = 20) -> list[tuple[str, str, datetime]]:
        """(rollout_id, phase, updated), newest first."""
        if limit < 1:
            raise ValueError(f"limit: must be at least 1, got {limit}")
        return [
            (str(rollout_id), str(phase), _dt(updated_us))
            for rollout_id, phase, updated_us in self._conn().execute(
                "SELECT rollout_id, phase, updated_us FROM rollouts "
                "ORDER BY updated_us DESC, rollout_id LIMIT ?",
                (limit,),
            )
        ]

    def promoted_rollouts(self) -> list[str]:
        """The state_json of every promoted rollout, the one changed first first."""
        return [
            str(state_json)
            for (state_json,) in self._conn().execute(
                "SELECT state_json FROM rollouts WHERE phase = ? "
                "ORDER BY updated_us, rollout_id",
                (Phase.PROMOTED.value,),
            )
        ]

    # -- the controller's own seq --

    def next_seq(self) -> int:
        """The controller's next message seq: monotonic across restarts, possibly with gaps."""
        with self._seq_lock:
            if self._seq_next >= self._seq_limit:
                with self._write(durable=True) as conn:
                    start = int(
                        conn.execute(
                            "UPDATE meta SET seq_reserved = seq_reserved + ? WHERE id = 0 "
                            "RETURNING seq_reserved - ?",
                            (_SEQ_BLOCK, _SEQ_BLOCK),
                        ).fetchone()[0]
                    )
                self._seq_next, self._seq_limit = start, start + _SEQ_BLOCK
            seq = self._seq_next
            self._seq_next += 1
            return seq


def _remember(tallies: OrderedDict[Any, Any], key: Any, tally: Any) -> None:
    """Keep `tally` as the most recently used of at most _TALLIES_KEPT."""
    tallies[key] = tally
    tallies.move_to_end(key)
    while len(tallies) > _TALLIES_KEPT:
        tallies.popitem(last=False)


def _prune_batch(
    conn: sqlite3.Connection, cutoff: int, after: tuple[int, int], batch: int
) -> list[tuple[int, int, int]]:
    """(id, received_us, receipted) of the next `batch` messages received before `cutoff`,
    in order of arrival, after the (received_us, id) `after`."""
    rows = conn.execute(_PRUNE_SAME_ARRIVAL, (*after, batch)).fetchall()
    if len(rows) < batch:
        rows += conn.execute(_PRUNE_LATER_ARRIVAL, (after[0], cutoff, batch - len(rows)))
    return rows


def _note_new_stream(conn: sqlite3.Connection, station: str, stream: str) -> None:
    """A station's first stream is its start; a later one means its storage was replaced."""
    earlier = conn.execute(
        "SELECT count(*) FROM streams WHERE station = ? AND stream != ?", (station, stream)
    ).fetchone()[0]
    if earlier:
        log.warning(
            "station %s started a new seq stream %r beside %d earlier: its storage was replaced "
            "(a new disk or an emptied data_dir); its earlier messages are kept",
            station, stream, earlier,
        )  # fmt: skip


class _WaitingWriters:
    """How many threads of this process wait for the write lock; a long series of writes (the
    prune) lets them go first between two of its transactions. SQLite's own wait for the lock
    polls, at most every 100 ms, so a writer that takes the lock back at once would keep
    them waiting until it is done."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0

    def __enter__(self) -> None:
        with self._changed:
            self._count += 1

    def __exit__(self, *_exc: object) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_for_none(self, timeout_s: float) -> bool:
        """Wait until no thread waits for the write lock (at most `timeout_s`: writers that
        come back to back would hold off the caller for ever); whether none does."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout_s)


class _ReuseLog:
    """Warns of seqs a station gave out again (its store restored from a backup), at most once
    a minute per station, with how many since the last warning: a restored station re-uses a
    seq on every message until it is past the seqs it had used. What came in the minute after
    a warning is logged by the first `flush` a minute after it (every ingest calls it)."""

    EVERY_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], list[int]] = {}  # -> [count, lowest, highest]
        self._logged_at: dict[str, float] = {}

    def add(self, station: str, stream: str, seqs: Sequence[int], now: float) -> None:
        with self._lock:
            entry = self._pending.setdefault((station, stream), [0, min(seqs), max(seqs)])
            entry[0] += len(seqs)
            entry[1], entry[2] = min(entry[1], *seqs), max(entry[2], *seqs)
        self.flush(now)

    def flush(self, now: float) -> None:
        """Log what is pending for every station not warned of in the last minute."""
        if not self._pending:
            return
        with self._lock:
            due = [(key, self._pending.pop(key)) for key in list(self._pending)
                   if now - self._logged_at.get(key[0], -math.inf) >= self.EVERY_S]  # fmt: skip
            for (station, _), _ in due:
                self._logged_at[station] = now
        for (station, text), (count, lowest, highest) in due:
            log.warning(
                "station %s gave out %d seq(s) of stream %r again, between %d and %d, for other "
                "messages: was its station.db restored from a backup? They are stored beside the "
                "earlier ones; nothing is lost",
                station, count, text, lowest, highest,
            )  # fmt: skip
