"""The station's outbox against a model: whatever the order of enqueues, receipts, refusals and
restarts, every message given a seq is in the outbox until a receipt covers it, exactly once, in
seq order, as it was built (docs/decisions/0003-outbox.md, 0009-seq-streams.md)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from edge_agent.store import OutboxFull, ReviewItem, StationStore, VerdictRow
from linesight import protocol as p

STATION = "st-model"
TOPICS = p.Topics()
TOPIC = {
    "decision": TOPICS.station(STATION, p.Channel.DECISION),
    "shadow": TOPICS.station(STATION, p.Channel.SHADOW),
    "ack": TOPICS.station(STATION, p.Channel.ACK),
    "verdict": TOPICS.station(STATION, p.Channel.VERDICT),
}
REF = p.ModelRef(name="part-classifier", version="1.0.0", sha256="c" * 64)
T0 = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
# Kept by the outbox whatever its depth, refused at the bound, and bad items that must spend no
# seq (a factory's ValueError or TypeError, a message with another seq, an empty topic).
KEPT = ("decision", "ack", "verdict")
FAILING = ("raises", "type_error", "wrong_seq", "no_topic")
ITEMS = st.sampled_from((*KEPT, "shadow", *FAILING))
BOUNDS = st.integers(min_value=1, max_value=5)

_part_ids = itertools.count()


def build(kind: str, seq: int) -> p.Envelope:
    """The message of `kind` with `seq`, as the agent's factories build it."""
    part_id = f"p{next(_part_ids)}"
    if kind == "decision":
        return p.Decision(
            station=STATION, seq=seq, part_id=part_id, decided_by=p.DecidedBy.ACTIVE,
            label="ok", confidence=0.9, action=p.Action.PASS, model=REF, latency_ms=1.0,
            automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.SHADOW,
        )  # fmt: skip
    if kind == "shadow":
        opinion = p.ModelOpinion(model=REF, label="ok", confidence=0.9, latency_ms=1.0)
        return p.ShadowResult(
            station=STATION, seq=seq, part_id=part_id, mode=p.DeploymentMode.SHADOW,
            active=opinion, candidate=opinion, agree=True,
        )  # fmt: skip
    if kind == "ack":
        return p.CommandAck(station=STATION, seq=seq, cmd_id=uuid.uuid4(), command="ping", ok=True)
    if kind == "verdict":
        return p.Verdict(
            station=STATION, seq=seq, part_id=part_id, operator="op-1",
            outcome=p.VerdictOutcome.REJECT, label="defect",
            review_reason=p.ReviewReason.LOW_CONFIDENCE, decided_at=T0,
        )  # fmt: skip
    raise AssertionError(f"no message of kind {kind!r}")


def item_for(kind: str) -> tuple[str, int, Callable[[int], p.Envelope]]:
    """An `enqueue_many` item of `kind`."""
    if kind == "raises":

        def broken(seq: int) -> p.Envelope:
            raise ValueError("model output unreadable")

        return TOPIC["decision"], 1, broken
    if kind == "type_error":

        def mistyped(seq: int) -> p.Envelope:
            raise TypeError("label: expected str, got float")

        return TOPIC["decision"], 1, mistyped
    if kind == "wrong_seq":
        return TOPIC["decision"], 1, lambda seq: build("decision", seq + 1)
    if kind == "no_topic":
        return "", 1, lambda seq: build("decision", seq)
    return TOPIC[kind], 1, lambda seq: build(kind, seq)


def verdict_message(row: VerdictRow, seq: int) -> p.Envelope:
    return p.Verdict(
        station=STATION, seq=seq, part_id=row.part_id, operator=row.operator,
        outcome=p.VerdictOutcome(row.outcome), label=row.label,
        review_reason=p.ReviewReason(row.review_reason), decided_at=row.decided_at,
    )  # fmt: skip


def review(part_id: str) -> ReviewItem:
    return ReviewItem(
        part_id=part_id, created=T0, reason="low_confidence", automation="partial",
        suggestion="ok", confidence=0.55, model_label="ok", candidate_label="ok",
        active_version="1.0.0", candidate_version=None, image_jpeg=b"\xff\xd8jpeg",
    )  # fmt: skip


class OutboxModel(RuleBasedStateMachine):
    """The model: the rows given out and not yet receipted, the seqs receipted, the next seq
    and the shadow messages refused."""

    def __init__(self) -> None:
        super().__init__()
        self.data_dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.store: StationStore | None = None
        self.bound = 1
        self.rows: dict[int, tuple[str, p.Envelope]] = {}  # seq -> (topic, message)
        self.deleted: set[int] = set()
        self.next_seq = 0
        self.shadow_dropped = 0
        self.stream: uuid.UUID | None = None

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def outbox(self) -> StationStore:
        assert self.store is not None
        return self.store

    @initialize(bound=BOUNDS)
    def open_store(self, bound: int) -> None:
        self.bound = bound
        self.store = StationStore(self.data_dir, max_outbox_rows=bound)
        self.stream = self.store.stream
        assert self.stream is not None, "a new store has a seq stream of its own"

    # -- what the agent does --

    def _expect(self, kind: str, depth: int) -> str:
        """What the outbox must do with an item of `kind` at `depth`: keep, refuse or fail."""
        if kind in FAILING:
            return "fail"
        if kind == "shadow" and depth >= self.bound:
            return "refuse"
        return "keep"

    def _kept(self, topic: str, message: p.Envelope) -> None:
        assert message.seq == self.next_seq, "seqs are given out contiguously"
        assert message.stream == self.stream, "the store sets its stream on every message"
        self.rows[message.seq] = (topic, message)
        self.next_seq += 1

    @rule(kind=ITEMS)
    def enqueue(self, kind: str) -> None:
        topic, qos, factory = item_for(kind)
        expected = self._expect(kind, len(self.rows))
        if expected == "fail":
            with pytest.raises((ValueError, TypeError)):
                self.outbox.enqueue(topic, qos, factory)
        elif expected == "refuse":
            with pytest.raises(OutboxFull) as refused:
                self.outbox.enqueue(topic, qos, factory)
            assert (refused.value.depth, refused.value.bound) == (len(self.rows), self.bound)
            self.shadow_dropped += 1
        else:
            self._kept(topic, self.outbox.enqueue(topic, qos, factory))

    @rule(kinds=st.lists(ITEMS, max_size=6))
    def enqueue_many(self, kinds: list[str]) -> None:
        items = [item_for(kind) for kind in kinds]
        results = self.outbox.enqueue_many(items)
        assert len(results) == len(kinds)
        for kind, (topic, _, _), result in zip(kinds, items, results, strict=True):
            expected = self._expect(kind, len(self.rows))
            if expected == "fail":
                assert isinstance(result, ValueError | TypeError), (kind, result)
            elif expected == "refuse":
                assert isinstance(result, OutboxFull), (kind, result)
                assert (result.depth, result.bound) == (len(self.rows), self.bound)
                self.shadow_dropped += 1
            else:
                assert isinstance(result, p.Envelope), (kind, result)
                self._kept(topic, result)

    @rule(kinds=st.lists(st.sampled_from(KEPT + ("shadow",)), max_size=3))
    def a_batch_whose_factory_crashes_is_not_stored_at_all(self, kinds: list[str]) -> None:
        """A factory error other than ValueError or TypeError rolls back the whole commit: no
        seq spent, no refusal counted."""

        def crash(seq: int) -> p.Envelope:
            raise RuntimeError("bug in a factory")

        items = [item_for(kind) for kind in kinds]
        with pytest.raises(RuntimeError, match="bug in a factory"):
            self.outbox.enqueue_many([*items, (TOPIC["decision"], 1, crash)])

    @rule()
    def publish_a_verdict(self) -> None:
        """Verdicts go through the outbox too, and the bound never refuses them."""
        part_id = f"v{next(_part_ids)}"
        assert self.outbox.add_review(review(part_id))
        assert self.outbox.record_verdict(part_id, "op-1", "pass", "ok", T0)
        published = self.outbox.publish_verdicts(lambda row: TOPIC["verdict"], verdict_message)
        assert [message.part_id for message in published] == [part_id]  # type: ignore[attr-defined]
        self._kept(TOPIC["verdict"], published[0])

    # -- what the controller's receipts do --

    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        """Any receipt: behind, repeated, ahead of the last seq; or invalid, which changes
        nothing."""
        upto = data.draw(st.integers(min_value=-3, max_value=self.next_seq + 2), label="upto")
        if upto < -1:
            with pytest.raises(ValueError, match="upto_seq"):
                self.outbox.acknowledge(upto)
            return
        covered = [seq for seq in self.rows if seq <= upto]
        assert self.outbox.acknowledge(upto) == len(covered)
        for seq in covered:
            del self.rows[seq]
        self.deleted.update(covered)

    # -- restarts --

    @rule(bound=BOUNDS)
    def restart(self, bound: int) -> None:
        """The agent stops and starts again on the same data dir, maybe with another bound."""
        self.outbox.close()
        self.bound = bound
        self.store = StationStore(self.data_dir, max_outbox_rows=bound)
        assert self.store.stream == self.stream, "a restart keeps the seq stream"

    @rule(data=st.data())
    def pending_pages(self, data: st.DataObject) -> None:
        """The relay pages through the outbox with `after_seq` and `limit`."""
        after = data.draw(st.integers(min_value=-1, max_value=self.next_seq), label="after")
        limit = data.draw(st.integers(min_value=1, max_value=4), label="limit")
        expected = sorted(seq for seq in self.rows if seq > after)[:limit]
        assert [row.seq for row in self.outbox.pending(limit=limit, after_seq=after)] == expected

    # -- what must hold after every step --

    @invariant()
    def every_unreceipted_message_is_pending_once_in_order_as_built(self) -> None:
        if self.store is None:
            return
        rows = self.outbox.pending(limit=10_000)
        assert [row.seq for row in rows] == sorted(self.rows)
        for row in rows:
            topic, message = self.rows[row.seq]
            assert (row.msg_id, row.topic, row.qos) == (str(message.msg_id), topic, 1)
            assert p.parse(type(message), row.payload) == message

    @invariant()
    def counters_agree_with_the_model(self) -> None:
        if self.store is None:
            return
        store = self.outbox
        assert store.outbox_depth() == len(self.rows)
        assert store.last_seq() == self.next_seq - 1
        assert store.outbox_full == (len(self.rows) >= self.bound)
        assert store.shadow_dropped == self.shadow_dropped

    @invariant()
    def receipted_upto_is_the_prefix_deleted_on_receipts(self) -> None:
        if self.store is None:
            return
        # Every seq given out is pending or was deleted by a receipt that covered it, and rows
        # leave oldest first: what was deleted is a prefix, and receipted_upto is its end.
        upto = max(self.deleted, default=-1)
        assert self.deleted == set(range(upto + 1))
        assert self.deleted | self.rows.keys() == set(range(self.next_seq))
        assert self.outbox.receipted_upto() == upto


OutboxModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
test_the_outbox_keeps_every_message_until_a_receipt_covers_it = OutboxModel.TestCase
