"""The station's local store: outbox seqs and bound, review queue, verdicts, quota, UI tables."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent import store as store_module
from edge_agent.store import (
    DB_FILE,
    SCHEMA_VERSION,
    OutboxFull,
    PartLogEntry,
    ReviewItem,
    StationStore,
    StoreError,
    VerdictRow,
    image_name_for,
)
from linesight import protocol as p
from linesight.sqlite_db import SqliteDatabase

STATION = "st-1"
T0 = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
REF = p.ModelRef(name="part-classifier", version="1.0.0", sha256="c" * 64)
TOPICS = p.Topics()
DECISION_TOPIC = TOPICS.station(STATION, p.Channel.DECISION)
SHADOW_TOPIC = TOPICS.station(STATION, p.Channel.SHADOW)
VERDICT_TOPIC = TOPICS.station(STATION, p.Channel.VERDICT)


@pytest.fixture
def store(tmp_data_dir: Path) -> Iterator[StationStore]:
    with StationStore(tmp_data_dir) as opened:
        yield opened


def decision(part_id: str) -> Callable[[int], p.Envelope]:
    def build(seq: int) -> p.Envelope:
        return p.Decision(
            station=STATION,
            seq=seq,
            part_id=part_id,
            decided_by=p.DecidedBy.OPERATOR,
            label=None,
            action=p.Action.REVIEW,
            review_reason=p.ReviewReason.HUMAN_ONLY,
            model=None,
            latency_ms=0.0,
            automation=p.AutomationLevel.HUMAN_ONLY,
            mode=p.DeploymentMode.NONE,
        )

    return build


def shadow(part_id: str) -> Callable[[int], p.Envelope]:
    def build(seq: int) -> p.Envelope:
        opinion = p.ModelOpinion(model=REF, label="good", confidence=0.9, latency_ms=1.0)
        return p.ShadowResult(
            station=STATION,
            seq=seq,
            part_id=part_id,
            mode=p.DeploymentMode.SHADOW,
            active=opinion,
            candidate=opinion,
            agree=True,
        )

    return build


def verdict_message(row: VerdictRow, seq: int) -> p.Envelope:
    return p.Verdict(
        station=STATION,
        seq=seq,
        part_id=row.part_id,
        operator=row.operator,
        outcome=p.VerdictOutcome(row.outcome),
        label=row.label,
        review_reason=p.ReviewReason(row.review_reason),
        model_label=row.model_label,
        candidate_label=row.candidate_label,
        decided_at=row.decided_at,
    )


def item(part_id: str, created: datetime = T0, image: bytes = b"\xff\xd8jpeg") -> ReviewItem:
    return ReviewItem(
        part_id=part_id,
        created=created,
        reason="low_confidence",
        automation="partial",
        suggestion="scratch",
        confidence=0.55,
        model_label="scratch",
        candidate_label="good",
        active_version="1.0.0",
        candidate_version="1.1.0",
        image_jpeg=image,
    )


# --- seq and outbox -------------------------------------------------------------------------


def test_seq_starts_at_zero_and_continues_across_reopen(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as store:
        assert store.last_seq() == -1
        seqs = [store.enqueue(DECISION_TOPIC, 1, decision(f"p{i}")).seq for i in range(3)]
        assert seqs == [0, 1, 2]
        store.acknowledge(2)
    with StationStore(tmp_data_dir) as store:
        assert store.last_seq() == 2
        assert store.enqueue(DECISION_TOPIC, 1, decision("p3")).seq == 3


def test_every_outbox_message_names_the_store_s_seq_stream(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as store:
        stream = store.stream
        assert stream is not None
        sent = store.enqueue(DECISION_TOPIC, 1, decision("p0"))
        assert sent.stream == stream
        assert p.parse(p.Decision, store.pending()[0].payload).stream == stream
        with pytest.raises(ValueError, match="stream"):
            store.enqueue(DECISION_TOPIC, 1, lambda seq: decision("p1")(seq).model_copy(
                update={"stream": uuid.uuid4()}
            ))
    with StationStore(tmp_data_dir) as store:
        assert store.stream == stream, "the stream is the store's: it survives a restart"
    with StationStore(tmp_data_dir.parent / "new-disk") as store:
        assert store.stream not in (None, stream), "a new store starts a stream of its own"


def test_a_store_that_numbered_messages_before_streams_keeps_none(tmp_data_dir: Path) -> None:
    """Its seq continues the stream the controller knows (the unnamed one); a store from
    then that never numbered anything gets a stream of its own."""
    for name, messages in (("numbered", 3), ("unused", 0)):
        old = SqliteDatabase(tmp_data_dir / name / DB_FILE, synchronous="FULL",
                             busy_timeout_s=5.0)  # fmt: skip
        (tmp_data_dir / name).mkdir(parents=True)
        old.migrate(store_module._MIGRATIONS[:1])
        with old.write() as conn:
            conn.execute("UPDATE outbox_meta SET next_seq = ?", (messages,))
        old.close()
    with StationStore(tmp_data_dir / "numbered") as store:
        assert store.stream is None
        sent = store.enqueue(DECISION_TOPIC, 1, decision("p3"))
        assert (sent.seq, sent.stream) == (3, None)
        assert b'"stream"' not in store.pending()[0].payload, "as before: no key at all"
    with StationStore(tmp_data_dir / "unused") as store:
        assert store.stream is not None


def test_receipted_upto_is_the_highest_seq_a_receipt_deleted(store: StationStore) -> None:
    assert store.receipted_upto() == -1
    for n in range(4):
        store.enqueue(DECISION_TOPIC, 1, decision(f"p{n}"))
    assert store.receipted_upto() == -1, "sent is not receipted"
    store.acknowledge(1)
    assert store.receipted_upto() == 1
    store.acknowledge(3)
    assert store.receipted_upto() == 3, "an empty outbox: everything numbered was receipted"


def test_enqueue_pending_acknowledge(store: StationStore) -> None:
    sent = [store.enqueue(DECISION_TOPIC, 1, decision(f"p{i}")) for i in range(5)]
    rows = store.pending()
    assert [r.seq for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].msg_id == str(sent[0].msg_id)
    assert rows[0].topic == DECISION_TOPIC and rows[0].qos == 1
    assert p.parse(p.Decision, rows[3].payload) == sent[3]
    assert [r.seq for r in store.pending(limit=2, after_seq=1)] == [2, 3]
    assert store.outbox_depth() == 5

    assert store.acknowledge(2) == 3
    assert [r.seq for r in store.pending()] == [3, 4]
    assert store.acknowledge(2) == 0  # a repeated receipt changes nothing
    assert store.acknowledge(10) == 2
    assert store.outbox_depth() == 0
    assert store.last_seq() == 4


def test_large_acknowledge_in_slices_counts_every_row(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_ACK_SLICE_ROWS", 7)
    for i in range(45):
        store.enqueue(DECISION_TOPIC, 1, decision(f"p{i}"))
    assert store.acknowledge(40) == 41
    assert store.outbox_depth() == 4
    assert store.pending(limit=1)[0].seq == 41


class _FullDisk:
    """A connection on a nearly full disk: a DELETE of more than `room` outbox rows fails as
    SQLite does when its journal cannot grow (SQLITE_FULL)."""

    def __init__(self, conn: sqlite3.Connection, room: int) -> None:
        self.conn, self.room, self.refused = conn, room, 0

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        if sql.startswith("DELETE FROM outbox"):
            rows = self.conn.execute("SELECT COUNT(*) FROM outbox WHERE seq <= ?",
                                     params).fetchone()[0]
            if rows > self.room:
                self.refused += 1
                full = sqlite3.OperationalError("database or disk is full")
                full.sqlite_errorcode = sqlite3.SQLITE_FULL
                raise full
        return self.conn.execute(sql, params)


def test_a_receipt_on_a_full_disk_still_drains_the_outbox_in_smaller_slices(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(300):
        store.enqueue(DECISION_TOPIC, 1, decision(f"p{i}"))
    write = store._write
    disk: list[_FullDisk] = []

    @contextlib.contextmanager
    def nearly_full(**kwargs: Any) -> Iterator[_FullDisk]:
        with write(**kwargs) as conn:
            disk.append(_FullDisk(conn, room=40))
            yield disk[-1]

    monkeypatch.setattr(store, "_write", nearly_full)
    assert store.acknowledge(299) == 300
    assert store.outbox_depth() == 0
    assert any(d.refused for d in disk), "the disk never refused: nothing was tested"


def test_failed_factory_spends_no_seq(store: StationStore) -> None:
    def broken(seq: int) -> p.Envelope:
        raise RuntimeError("model output unreadable")

    with pytest.raises(RuntimeError):
        store.enqueue(DECISION_TOPIC, 1, broken)
    with pytest.raises(ValueError, match="factory"):
        store.enqueue(DECISION_TOPIC, 1, lambda seq: decision("p")(seq + 1))
    metrics = p.StationMetrics(station=STATION, seq=0, window_s=1.0, parts=0)
    with pytest.raises(ValueError, match="outbox"):
        store.enqueue(DECISION_TOPIC, 0, lambda seq: metrics)
    assert store.outbox_depth() == 0
    assert store.enqueue(DECISION_TOPIC, 1, decision("p")).seq == 0


def test_bound_refuses_shadow_and_keeps_decisions(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir, max_outbox_rows=3) as store:
        store.enqueue(SHADOW_TOPIC, 1, shadow("p0"))
        for i in range(1, 3):
            store.enqueue(DECISION_TOPIC, 1, decision(f"p{i}"))
        assert store.outbox_full

        with pytest.raises(OutboxFull):
            store.enqueue(SHADOW_TOPIC, 1, shadow("p3"))
        assert store.shadow_dropped == 1
        # Decisions are never refused, and the refused shadow spent no seq.
        assert store.enqueue(DECISION_TOPIC, 1, decision("p4")).seq == 3
        assert store.outbox_depth() == 4

        store.acknowledge(1)
        assert not store.outbox_full
        assert store.enqueue(SHADOW_TOPIC, 1, shadow("p5")).seq == 4
    with StationStore(tmp_data_dir, max_outbox_rows=3) as store:
        assert store.shadow_dropped == 1


def test_a_batch_keeps_seqs_contiguous_around_failures_and_refusals(
    tmp_data_dir: Path,
) -> None:
    def wrong_seq(seq: int) -> p.Envelope:
        return decision("bad")(seq + 5)

    with StationStore(tmp_data_dir, max_outbox_rows=2) as store:
        results = store.enqueue_many([
            (DECISION_TOPIC, 1, decision("p0")),
            (DECISION_TOPIC, 1, wrong_seq),
            ("", 1, decision("no-topic")),
            (SHADOW_TOPIC, 1, shadow("p1")),
            (SHADOW_TOPIC, 1, shadow("p2")),  # the bound (2 rows) is reached: refused
            (DECISION_TOPIC, 1, decision("p3")),  # decisions are never refused
        ])
        assert [type(r).__name__ for r in results] == [
            "Decision", "ValueError", "ValueError", "ShadowResult", "OutboxFull", "Decision",
        ]
        stored = [r for r in results if isinstance(r, p.Envelope)]
        assert [m.seq for m in stored] == [0, 1, 2]
        assert [row.seq for row in store.pending()] == [0, 1, 2]
        assert [row.msg_id for row in store.pending()] == [str(m.msg_id) for m in stored]
        assert store.outbox_depth() == 3
        assert store.shadow_dropped == 1
        assert store.enqueue(DECISION_TOPIC, 1, decision("p4")).seq == 3


def test_ui_reader_never_blocks_the_outbox(store: StationStore) -> None:
    store.enqueue(DECISION_TOPIC, 1, decision("p0"))
    ui = sqlite3.connect(store.path, isolation_level=None)
    try:
        ui.execute("BEGIN")
        ui.execute("SELECT COUNT(*) FROM outbox").fetchone()
        # A UI page in the middle of a read does not hold up the agent's writes.
        assert store.enqueue(DECISION_TOPIC, 1, decision("p1")).seq == 1
        assert ui.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ui.execute("COMMIT")
    finally:
        ui.close()


def test_second_process_view_shares_the_store(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as agent, StationStore(tmp_data_dir) as ui:
        agent.enqueue(DECISION_TOPIC, 1, decision("p0"))
        assert ui.outbox_depth() == 1
        ui.add_review(item("p0"))
        assert agent.review_count() == 1


# --- review queue and images ----------------------------------------------------------------


def test_add_review_is_idempotent(store: StationStore) -> None:
    assert store.add_review(item("p1", image=b"first"))
    assert not store.add_review(item("p1", image=b"second"))
    path = store.image_path("p1")
    assert path is not None and path.read_bytes() == b"first"
    assert store.review_count() == 1
    assert sorted(f.name for f in store.images_dir.iterdir()) == [image_name_for("p1")]


def test_reviews_in_one_batch_are_each_stored_once(store: StationStore) -> None:
    store.add_review(item("old", image=b"old"))
    added = store.add_reviews([
        item("a", image=b"a"), item("old", image=b"again"), item("b", image=b"b"),
        item("a", image=b"a twice"),
    ])
    assert added == [True, False, True, False]
    assert store.review_count() == 3
    for part, content in (("a", b"a"), ("b", b"b"), ("old", b"old")):
        path = store.image_path(part)
        assert path is not None and path.read_bytes() == content
    assert sorted(f.name for f in store.images_dir.iterdir()) == sorted(
        image_name_for(part) for part in ("a", "b", "old")
    )  # no temp file left behind


def test_part_ids_to_avoid_are_the_latest_logged_and_every_queued_one(
    store: StationStore,
) -> None:
    assert store.part_ids_to_avoid("syn-7-") == []
    store.log_parts([
        PartLogEntry(part_id=part, ts=T0, action="pass", decided_by="active",
                     active_label="good", candidate_label=None, agree=None,
                     active_confidence=0.9)
        for part in ("syn-7-00000001", "syn-7-00000002", "syn-8-00000050", "syn-7-00000003",
                     "other-1")
    ])
    store.add_reviews([item("syn-7-00000009"), item("syn-70-00000100"), item("x-syn-7-1")])
    assert sorted(store.part_ids_to_avoid("syn-7-")) == ["syn-7-00000003", "syn-7-00000009"]
    assert store.part_ids_to_avoid("syn-8-") == ["syn-8-00000050"]


def test_review_rows_round_trip(store: StationStore) -> None:
    store.add_review(item("late", created=T0 + timedelta(minutes=1)))
    store.add_review(item("early", created=T0))
    rows = store.pending_reviews()
    assert [r.part_id for r in rows] == ["early", "late"]
    assert [r.part_id for r in store.pending_reviews(oldest_first=False)] == ["late", "early"]
    row = store.review("early")
    assert row is not None
    assert row.created == T0 and row.confidence == 0.55 and row.candidate_version == "1.1.0"
    assert row.image_bytes == len(b"\xff\xd8jpeg") and row.outcome is None
    assert store.review("missing") is None and store.image_path("missing") is None


@pytest.mark.parametrize(
    "part_id", ["../../etc/passwd", "<script>alert(1)</script>", "/abs/path", "a\\b", ".", ".."]
)
def test_hostile_part_ids_never_become_paths(store: StationStore, part_id: str) -> None:
    assert store.add_review(item(part_id))
    path = store.image_path(part_id)
    assert path is not None
    assert path.parent == store.images_dir
    assert path.name == image_name_for(part_id)
    assert all(c in "0123456789abcdef" for c in path.stem) and len(path.stem) == 64
    files = {f.relative_to(store.data_dir) for f in store.data_dir.rglob("*") if f.is_file()}
    assert all(f.parts[0] == "images" or f.name.startswith(DB_FILE) for f in files)


def test_review_item_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="reason"):
        dataclasses.replace(item("p"), reason="because")
    with pytest.raises(ValueError, match="created"):
        dataclasses.replace(item("p"), created=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="confidence"):
        dataclasses.replace(item("p"), confidence=float("nan"))
    with pytest.raises(ValueError, match="part_id"):
        dataclasses.replace(item("p"), part_id="")


# --- quota and retention --------------------------------------------------------------------


def test_quota_prunes_confirmed_oldest_first_and_never_unconfirmed(store: StationStore) -> None:
    for i in range(4):
        store.add_review(item(f"p{i}", created=T0 + timedelta(minutes=i), image=bytes(100)))
    for part in ("p0", "p1", "p3"):
        store.record_verdict(part, "ana", "pass", "good", T0 + timedelta(hours=1))

    report = store.enforce_quota(250)
    assert report.pruned_confirmed == 2 and report.bytes_used == 200 and not report.over_quota
    assert store.image_path("p0") is None and store.image_path("p1") is None
    assert not (store.images_dir / image_name_for("p0")).exists()
    kept = store.image_path("p2")
    assert kept is not None and kept.exists()

    report = store.enforce_quota(50)
    assert report.pruned_confirmed == 1  # p3, confirmed though younger than p2
    assert report.bytes_used == 100
    assert report.over_quota_bytes == 50 and report.over_quota_unconfirmed == 1
    assert kept.exists() and store.review_count() == 1


def test_quota_reports_unconfirmed_overflow(store: StationStore) -> None:
    for i in range(3):
        store.add_review(item(f"p{i}", created=T0 + timedelta(minutes=i), image=bytes(100)))
    report = store.enforce_quota(150)
    assert report.pruned_confirmed == 0
    assert report.bytes_used == 300 and report.over_quota_bytes == 150
    assert report.over_quota_unconfirmed == 2
    assert all(store.image_path(f"p{i}") is not None for i in range(3))


def test_prune_confirmed_keeps_unpublished_and_pending(store: StationStore) -> None:
    for i in range(3):
        store.add_review(item(f"p{i}", created=T0))
    store.record_verdict("p0", "ana", "reject", "scratch", T0)
    store.record_verdict("p1", "ana", "reject", "scratch", T0)
    store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message, limit=1)
    pruned = store.prune_confirmed(timedelta(days=7), now=T0 + timedelta(days=8))
    assert pruned == 1
    assert store.review("p0") is None and not (store.images_dir / image_name_for("p0")).exists()
    assert store.review("p1") is not None  # verdict not yet in the outbox
    assert store.review("p2") is not None  # never confirmed
    assert store.prune_confirmed(timedelta(days=7), now=T0 + timedelta(days=6)) == 0


# --- verdicts -------------------------------------------------------------------------------


def test_verdict_is_written_once(store: StationStore) -> None:
    store.add_review(item("p1"))
    assert store.record_verdict("p1", "ana", "reject", "scratch", T0)
    assert not store.record_verdict("p1", "bo", "pass", "good", T0 + timedelta(seconds=1))
    row = store.review("p1")
    assert row is not None and row.outcome == "reject"
    assert [v.operator for v in store.verdicts_since(T0)] == ["ana"]
    assert store.review_count() == 0
    with pytest.raises(KeyError):
        store.record_verdict("never-seen", "ana", "pass", "good", T0)
    with pytest.raises(ValueError, match="outcome"):
        store.record_verdict("p1", "ana", "maybe", None, T0)


def test_two_screens_racing_for_a_verdict_get_exactly_one_win(store: StationStore) -> None:
    parts = [f"p{i}" for i in range(20)]
    for part in parts:
        store.add_review(item(part))
    results: dict[str, list[bool]] = {part: [] for part in parts}
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def screen(operator: str) -> None:
        for part in parts:
            barrier.wait()
            won = store.record_verdict(part, operator, "pass", "good", T0)
            with lock:
                results[part].append(won)

    threads = [threading.Thread(target=screen, args=(name,)) for name in ("ana", "bo")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(sorted(wins) == [False, True] for wins in results.values())


def test_publish_verdicts_enqueues_each_once(store: StationStore) -> None:
    store.add_review(item("p1"))
    store.add_review(item("p2"))
    store.enqueue(DECISION_TOPIC, 1, decision("p1"))
    store.record_verdict("p1", "ana", "reject", "scratch", T0 + timedelta(seconds=5))
    store.record_verdict("p2", "ana", "escalate", None, T0 + timedelta(seconds=6))

    def failing(row: VerdictRow, seq: int) -> p.Envelope:
        raise RuntimeError("crash between enqueue and mark")

    with pytest.raises(RuntimeError):
        store.publish_verdicts(lambda row: VERDICT_TOPIC, failing)
    assert store.outbox_depth() == 1 and len(store.unpublished_verdicts(10)) == 2

    sent = store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)
    assert [m.seq for m in sent] == [1, 2]
    assert store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message) == []
    assert store.unpublished_verdicts(10) == []
    rows = store.pending()
    assert [r.topic for r in rows] == [DECISION_TOPIC, VERDICT_TOPIC, VERDICT_TOPIC]
    first = p.parse(p.Verdict, rows[1].payload)
    assert first.part_id == "p1" and first.model_label == "scratch"
    assert first.decided_at == T0 + timedelta(seconds=5)
    assert [v.published_seq for v in store.verdicts_since(T0)] == [1, 2]


def test_an_escalation_waits_for_a_supervisor_whose_verdict_is_published_after_it(
    store: StationStore,
) -> None:
    for part in ("e1", "e2", "p3"):
        store.add_review(item(part))
    store.record_verdict("e1", "ana", "escalate", None, T0 + timedelta(seconds=1))
    store.record_verdict("e2", "bo", "escalate", None, T0 + timedelta(seconds=2))
    store.record_verdict("p3", "ana", "pass", "good", T0 + timedelta(seconds=3))
    assert [(e.review.part_id, e.operator) for e in store.escalations()] == [
        ("e1", "ana"), ("e2", "bo"),
    ]
    assert store.escalation_count() == 2
    assert store.escalations()[0].escalated_at == T0 + timedelta(seconds=1)

    # Resolved before the escalation itself went out: the escalation is published first.
    assert store.resolve_escalation("e1", "sup-9", "reject", "scratch", T0 + timedelta(minutes=1))
    assert not store.resolve_escalation("e1", "sup-8", "pass", "good", T0 + timedelta(minutes=2))
    assert [e.review.part_id for e in store.escalations()] == ["e2"]
    assert store.escalation_count() == 1
    with pytest.raises(KeyError):
        store.resolve_escalation("p3", "sup-9", "reject", "scratch", T0)  # not an escalation
    with pytest.raises(KeyError):
        store.resolve_escalation("nope", "sup-9", "reject", "scratch", T0)
    with pytest.raises(ValueError, match="outcome"):
        store.resolve_escalation("e2", "sup-9", "escalate", "scratch", T0)

    sent = store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)
    verdicts = [p.parse(p.Verdict, row.payload) for row in store.pending()]
    assert [m.seq for m in sent] == [v.seq for v in verdicts] == [0, 1, 2, 3]
    assert [(v.part_id, v.operator, v.outcome.value, v.label) for v in verdicts] == [
        ("e1", "ana", "escalate", None),
        ("e2", "bo", "escalate", None),
        ("p3", "ana", "pass", "good"),
        ("e1", "sup-9", "reject", "scratch"),
    ]
    assert verdicts[3].review_reason == verdicts[0].review_reason
    assert store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message) == []


def test_a_supervisor_corrects_an_operators_verdict_once(store: StationStore) -> None:
    """A wrong button tapped: the supervisor's other outcome goes out as a second, labelled
    Verdict after the operator's, which the controller keeps as the part's truth."""
    for i, part in enumerate(("p1", "r2", "e3", "p4")):
        store.add_review(item(part, created=T0 + timedelta(minutes=i)))
    store.record_verdict("p1", "ana", "pass", "good", T0)
    store.record_verdict("r2", "bo", "reject", "scratch", T0 + timedelta(seconds=1))
    store.record_verdict("e3", "ana", "escalate", None, T0 + timedelta(seconds=2))
    store.record_verdict("p4", "ana", "pass", "good", T0 + timedelta(seconds=3))
    assert [v.part_id for v in store.correctable_verdicts()] == ["p4", "r2", "p1"]

    assert store.correct_verdict("p1", "sup-9", "reject", "scratch", T0 + timedelta(minutes=5))
    assert not store.correct_verdict("p1", "sup-8", "reject", "dent", T0 + timedelta(minutes=6))
    assert [v.part_id for v in store.correctable_verdicts()] == ["p4", "r2"]
    with pytest.raises(ValueError, match="is pass already"):
        store.correct_verdict("p4", "sup-9", "pass", "good", T0)
    with pytest.raises(KeyError):
        store.correct_verdict("e3", "sup-9", "pass", "good", T0)  # an escalation is resolved
    with pytest.raises(KeyError):
        store.correct_verdict("x9", "sup-9", "pass", "good", T0)  # never judged
    with pytest.raises(ValueError, match="outcome"):
        store.correct_verdict("r2", "sup-9", "escalate", "good", T0)

    store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)
    verdicts = [p.parse(p.Verdict, row.payload) for row in store.pending()]
    assert [(v.part_id, v.operator, v.outcome.value, v.label) for v in verdicts] == [
        ("p1", "ana", "pass", "good"),
        ("r2", "bo", "reject", "scratch"),
        ("e3", "ana", "escalate", None),
        ("p4", "ana", "pass", "good"),
        ("p1", "sup-9", "reject", "scratch"),
    ]
    # The correction is published before the part may be pruned, and is pruned with it.
    assert store.prune_confirmed(timedelta(0), now=T0 + timedelta(days=1)) == 3
    assert store.correctable_verdicts() == []


def test_an_unresolved_escalation_keeps_its_image_and_its_part(store: StationStore) -> None:
    for i, part in enumerate(("e0", "p1", "e2")):
        store.add_review(item(part, created=T0 + timedelta(minutes=i), image=bytes(100)))
    store.record_verdict("e0", "ana", "escalate", None, T0)
    store.record_verdict("p1", "ana", "pass", "good", T0)
    store.record_verdict("e2", "ana", "escalate", None, T0)
    store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)

    report = store.enforce_quota(0)
    assert report.pruned_confirmed == 1  # p1 only
    assert report.over_quota_unconfirmed == 2 and report.over_quota_bytes == 200
    assert store.image_path("e0") is not None and store.image_path("p1") is None
    assert store.prune_confirmed(timedelta(0), now=T0 + timedelta(days=1)) == 1
    assert [e.review.part_id for e in store.escalations()] == ["e0", "e2"]

    store.resolve_escalation("e0", "sup-9", "pass", "good", T0 + timedelta(hours=1))
    assert store.prune_confirmed(timedelta(0), now=T0 + timedelta(days=1)) == 0  # not sent yet
    store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)
    assert store.enforce_quota(0).pruned_confirmed == 1
    assert store.prune_confirmed(timedelta(0), now=T0 + timedelta(days=1)) == 1
    assert store.review("e0") is None and store.review("e2") is not None


def test_a_store_of_schema_2_gains_resolutions(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as store:
        store.add_review(item("e1"))
        store.record_verdict("e1", "ana", "escalate", None, T0)
    raw = sqlite3.connect(tmp_data_dir / DB_FILE)
    raw.executescript(
        "DROP VIEW confirmed; DROP VIEW unpublished; DROP TABLE resolutions; "
        "DROP TABLE ui_sessions; PRAGMA user_version=2;"
    )
    raw.close()
    with StationStore(tmp_data_dir) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert [e.review.part_id for e in store.escalations()] == ["e1"]
        assert store.resolve_escalation("e1", "sup-9", "pass", "good", T0)


def test_verdicts_are_published_even_when_the_outbox_is_full(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir, max_outbox_rows=1) as store:
        store.enqueue(DECISION_TOPIC, 1, decision("p0"))
        store.add_review(item("p1"))
        store.record_verdict("p1", "ana", "pass", "good", T0)
        assert len(store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)) == 1
        assert store.outbox_depth() == 2


# --- command log, documents -----------------------------------------------------------------


def test_command_log(store: StationStore) -> None:
    assert store.command_result("c1") is None
    store.record_command("c1", "promote", '{"ok":true}')
    store.record_command("c1", "promote", '{"ok":false}')
    assert store.command_result("c1") == '{"ok":true}'


def test_slots_and_status_round_trip(tmp_data_dir: Path) -> None:
    slots = {"active": {"name": "part-classifier", "version": "1.0.0"}, "candidate": None}
    with StationStore(tmp_data_dir) as store:
        assert store.load_slots() is None and store.load_status() is None
        store.save_slots(slots)
        store.save_status({"online": True, "outbox_depth": 0})
        store.save_status({"online": True, "outbox_depth": 3})
    with StationStore(tmp_data_dir) as store:
        assert store.load_slots() == slots
        loaded = store.load_status()
        assert loaded is not None
        doc, updated_at = loaded
        assert doc == {"online": True, "outbox_depth": 3}
        assert abs(datetime.now(UTC) - updated_at) < timedelta(minutes=1)
        with pytest.raises(ValueError, match="doc"):
            store.save_status({"nan": float("nan")})


# --- part log and statistics ----------------------------------------------------------------


def entry(
    part_id: str, ts: datetime, action: str, candidate: str | None, agree: bool | None
) -> PartLogEntry:
    return PartLogEntry(part_id, ts, action, "active", "good", candidate, agree, 0.9)


def test_part_log_entries_ride_in_the_messages_commit_and_never_cost_them(
    store: StationStore,
) -> None:
    stored = store.enqueue_many(
        [(DECISION_TOPIC, 1, decision("p0"))], part_log=[entry("p0", T0, "pass", None, None)]
    )
    assert [m.seq for m in stored if isinstance(m, p.Envelope)] == [0]
    assert store.part_stats(T0 - timedelta(hours=1)).parts == 1
    with store._write() as conn:  # a part log that cannot be written (here: it is gone)
        conn.execute("DROP TABLE part_log")
    stored = store.enqueue_many(
        [(DECISION_TOPIC, 1, decision("p1"))], part_log=[entry("p1", T0, "pass", None, None)]
    )
    assert [m.seq for m in stored if isinstance(m, p.Envelope)] == [1]
    assert store.outbox_depth() == 2


def test_part_stats(store: StationStore) -> None:
    store.log_part(entry("old", T0 - timedelta(hours=1), "pass", None, None))
    store.log_part(entry("a", T0 + timedelta(seconds=10), "pass", "good", True))
    store.log_part(entry("b", T0 + timedelta(seconds=20), "pass", "scratch", False))
    store.log_part(entry("c", T0 + timedelta(seconds=30), "reject", "good", True))
    store.log_part(entry("d", T0 + timedelta(minutes=3), "review", None, None))
    for part in ("c", "d", "e"):
        store.add_review(item(part))  # model_label "scratch"
    store.record_verdict("c", "ana", "reject", "scratch", T0 + timedelta(minutes=1))
    store.record_verdict("d", "ana", "pass", "good", T0 + timedelta(minutes=4))
    store.record_verdict("e", "ana", "escalate", None, T0 + timedelta(minutes=5))

    stats = store.part_stats(T0)
    assert stats.parts == 4
    assert stats.actions == {"pass": 2, "reject": 1, "review": 1}
    assert stats.decided_by == {"active": 4}
    assert stats.shadow_pairs == 3 and stats.agreement_rate == pytest.approx(2 / 3)
    assert stats.verdicts == 3
    assert stats.operator_model_pairs == 2 and stats.operator_model_agreement == 0.5
    assert stats.throughput == [
        (T0, 3),
        (T0 + timedelta(minutes=1), 0),
        (T0 + timedelta(minutes=2), 0),
        (T0 + timedelta(minutes=3), 1),
    ]

    empty = store.part_stats(T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert empty.parts == 0 and empty.agreement_rate is None and empty.throughput == []

    # A part stamped ten years ahead (the station's clock was wrong) counts, but the chart
    # still ends at `until`, not ten years of empty minutes later.
    store.log_part(entry("ahead", T0 + timedelta(days=3650), "pass", None, None))
    ahead = store.part_stats(T0, T0 + timedelta(minutes=5))
    assert ahead.parts == 5 and ahead.throughput == stats.throughput

    assert store.prune_part_log(timedelta(minutes=30), now=T0) == 1
    assert store.part_stats(T0 - timedelta(days=1)).parts == 5


# --- operators and UI requests --------------------------------------------------------------


def test_operators(store: StationStore) -> None:
    assert store.operator("b1") is None
    store.upsert_operator("b1", "Ana", "operator", "hash-1")
    store.upsert_operator("b1", "Ana P.", "supervisor", "hash-2")
    row = store.operator("b1")
    assert row is not None
    assert (row.name, row.role, row.pin_hash) == ("Ana P.", "supervisor", "hash-2")
    assert row.updated >= row.created
    with pytest.raises(ValueError, match="role"):
        store.upsert_operator("b2", "Bo", "admin", "h")


def test_ui_requests_stay_open_until_the_slots_save_that_carries_them_takes_them(
    tmp_data_dir: Path,
) -> None:
    with StationStore(tmp_data_dir) as agent, StationStore(tmp_data_dir) as ui:
        first = ui.request_automation("partial", "line is stable", "b1")
        second = ui.request_automation("human_only", "new batch", "b1")
        asked = [(first, "partial", "b1"), (second, "human_only", "b1")]
        assert [(r.id, r.level, r.by) for r in agent.open_requests()] == asked
        assert [(r.id, r.level, r.by) for r in agent.open_requests()] == asked, "read, not taken"
        assert [r.id for r in agent.open_requests(after=first)] == [second]
        agent.save_slots({"automation": "partial"}, requests=[first])
        assert [r.id for r in ui.open_requests()] == [second]
        agent.save_slots({"automation": "human_only"}, requests=[first, second])
        assert ui.open_requests() == []
        with pytest.raises(ValueError, match="level"):
            ui.request_automation("auto", "", "b1")
        with pytest.raises(ValueError, match="after"):
            agent.open_requests(after=-1)


def test_a_slots_save_that_fails_takes_no_request(store: StationStore) -> None:
    request = store.request_automation("full", "stable", "b1")
    raw = sqlite3.connect(store.path)
    raw.execute("CREATE TRIGGER refuse_slots BEFORE INSERT ON documents WHEN NEW.name = 'slots' "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    raw.commit()
    with pytest.raises(sqlite3.Error, match="disk is full"):
        store.save_slots({"automation": "full"}, requests=[request])
    assert [r.id for r in store.open_requests()] == [request]
    raw.execute("DROP TRIGGER refuse_slots")
    raw.commit()
    raw.close()
    store.save_slots({"automation": "full"}, requests=[request])
    assert store.open_requests() == []
    assert store.load_slots() == {"automation": "full"}


def test_a_reader_after_the_last_id_it_saw_misses_no_request_of_concurrent_screens(
    tmp_data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent remembers only the last request id it took in hand."""
    monkeypatch.setattr("edge_agent.store.MAX_OPEN_REQUESTS", 60)  # none is taken here
    asked: list[int] = []
    lock = threading.Lock()

    def screen() -> None:
        with StationStore(tmp_data_dir) as ui:
            for _ in range(20):
                request = ui.request_automation("full", "", "b1")
                with lock:
                    asked.append(request)

    seen: list[int] = []
    with StationStore(tmp_data_dir) as agent:
        threads = [threading.Thread(target=screen) for _ in range(3)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads) or len(seen) < len(asked):
            seen.extend(r.id for r in agent.open_requests(after=seen[-1] if seen else 0))
        for thread in threads:
            thread.join(timeout=30)
    assert seen == sorted(asked) and len(seen) == 60


# --- boundaries and lifecycle ---------------------------------------------------------------


def test_arguments_are_validated_by_name(store: StationStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.pending(limit=-1)
    with pytest.raises(ValueError, match="limit"):
        store.pending_reviews(limit=0)
    with pytest.raises(ValueError, match="upto_seq"):
        store.acknowledge(-2)
    with pytest.raises(ValueError, match="qos"):
        store.enqueue(DECISION_TOPIC, 3, decision("p"))
    with pytest.raises(ValueError, match="max_bytes"):
        store.enforce_quota(-1)
    with pytest.raises(ValueError, match="older_than"):
        store.prune_part_log(timedelta(days=-1))
    with pytest.raises(ValueError, match="max_outbox_rows"):
        StationStore(store.data_dir, max_outbox_rows=0)


def test_schema_version_and_newer_schema_refused(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as store:
        assert store.schema_version() == SCHEMA_VERSION == 4
    raw = sqlite3.connect(tmp_data_dir / DB_FILE)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(StoreError, match="schema 99"):
        StationStore(tmp_data_dir)


def test_closed_store_refuses_use(tmp_data_dir: Path) -> None:
    store = StationStore(tmp_data_dir)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.last_seq()


def test_history_is_pruned_but_open_requests_are_kept(store: StationStore) -> None:
    store.record_command("c-1", "promote", '{"ok": true, "error": null}')
    taken = store.request_automation("full", "night shift", by="9001")
    store.save_slots({"automation": "full"}, requests=[taken])
    store.request_automation("partial", "day shift", by="9001")  # still open
    later = datetime.now(UTC) + timedelta(days=40)
    assert store.prune_history(timedelta(days=30)) == 0
    assert store.prune_history(timedelta(days=30), now=later) == 2
    assert store.command_result("c-1") is None
    assert [r.level for r in store.open_requests()] == ["partial"]


def test_the_orphan_sweep_passes_over_a_file_that_vanishes_while_it_looks(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer renames its temporary image files into place while housekeeping sweeps."""
    old = time.time() - 2 * store_module._ORPHAN_GRACE_S  # noqa: SLF001 - the grace period
    for name in (".7-1.tmp", "orphan.jpg"):
        path = store.images_dir / name
        path.write_bytes(b"\xff\xd8jpeg")
        os.utime(path, (old, old))
    with os.scandir(store.images_dir) as listing:
        entries = list(listing)
    (store.images_dir / ".7-1.tmp").unlink()  # renamed between the listing and the look

    class Listed:  # what os.scandir gives: iterable, and a context manager
        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(entries)

        def __enter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(entries)

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(os, "scandir", lambda path: Listed())  # the store's own os module
    report = store.enforce_quota(10**9)
    assert report.over_quota_bytes == 0
    assert not (store.images_dir / "orphan.jpg").exists(), "a real orphan is still swept"


# --- the UI's live sign-ins ---------------------------------------------------------------------

HOUR = timedelta(hours=1)


def test_a_ui_session_is_live_until_ended_or_too_old(store: StationStore) -> None:
    store.start_ui_session("s1", T0, HOUR)
    assert store.ui_session_live("s1", T0 + HOUR, HOUR)
    assert not store.ui_session_live("s1", T0 + HOUR + timedelta(microseconds=1), HOUR)
    assert not store.ui_session_live("s2", T0, HOUR)
    assert store.end_ui_session("s1")
    assert not store.ui_session_live("s1", T0, HOUR)
    assert not store.end_ui_session("s1"), "ending it twice is nothing to do"


def test_a_ui_sign_in_forgets_expired_sessions_and_the_oldest_past_the_cap(
    store: StationStore,
) -> None:
    store.start_ui_session("expired", T0, HOUR)
    for n in range(4):
        store.start_ui_session(f"s{n}", T0 + HOUR + timedelta(seconds=n), HOUR, max_sessions=3)
    assert store.ui_session_count() == 3
    live = [
        s for s in ("expired", "s0", "s1", "s2", "s3")
        if store.ui_session_live(s, T0 + HOUR + timedelta(seconds=4), HOUR)
    ]
    assert live == ["s1", "s2", "s3"]


def test_the_ui_session_cap_keeps_the_newest_of_one_microsecond(store: StationStore) -> None:
    """A clock that stands still (or steps back) still evicts the earlier sign-in."""
    for n in range(3):
        store.start_ui_session(f"s{n}", T0, HOUR, max_sessions=2)
    assert [store.ui_session_live(f"s{n}", T0, HOUR) for n in range(3)] == [False, True, True]


def test_ui_sessions_are_shared_by_two_stores_on_one_data_dir(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as first, StationStore(tmp_data_dir) as second:
        first.start_ui_session("s1", T0, HOUR)
        assert second.ui_session_live("s1", T0, HOUR)
        assert second.end_ui_session("s1")
        assert not first.ui_session_live("s1", T0, HOUR)


def test_ui_session_arguments_are_checked(store: StationStore) -> None:
    with pytest.raises(ValueError, match="session_id: a non-empty string is required"):
        store.start_ui_session("", T0, HOUR)
    with pytest.raises(ValueError, match="now: a timezone-aware datetime is required"):
        store.start_ui_session("s1", datetime(2025, 3, 4), HOUR)
    with pytest.raises(ValueError, match="max_age: a positive timedelta is required"):
        store.ui_session_live("s1", T0, timedelta(0))
    with pytest.raises(ValueError, match="max_sessions: must be at least 1, got 0"):
        store.start_ui_session("s1", T0, HOUR, max_sessions=0)
    assert store.ui_session_count() == 0


def test_a_store_of_schema_3_gains_ui_sessions_in_place(tmp_data_dir: Path) -> None:
    old = SqliteDatabase(tmp_data_dir / DB_FILE, synchronous="FULL", busy_timeout_s=5.0)
    tmp_data_dir.mkdir(parents=True, exist_ok=True)
    old.migrate(store_module._MIGRATIONS[:3])
    with old.write() as conn:
        conn.execute(
            "INSERT INTO operators (badge, name, role, pin_hash, created_us, updated_us) "
            "VALUES ('op-7', 'Ana', 'operator', 'h', 0, 0)"
        )
    old.close()
    with StationStore(tmp_data_dir) as store:
        assert store.schema_version() == SCHEMA_VERSION == 4
        assert store.operator("op-7") is not None, "the data of schema 3 is kept"
        store.start_ui_session("s1", T0, HOUR)
        assert store.ui_session_live("s1", T0, HOUR)
