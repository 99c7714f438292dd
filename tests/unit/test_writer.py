"""The group-commit writer: messages first, then what follows them, batch by batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.store import ReviewItem, StationStore
from edge_agent.writer import DurableWriter
from linesight import protocol as p

pytestmark = pytest.mark.unit

STATION = "st-1"
TOPIC = p.Topics().station(STATION, p.Channel.DECISION)
SHADOW = p.Topics().station(STATION, p.Channel.SHADOW)


def decision(part_id: str) -> p.Decision:
    return p.Decision(
        station=STATION, seq=0, part_id=part_id, decided_by=p.DecidedBy.OPERATOR, label=None,
        action=p.Action.REVIEW, review_reason=p.ReviewReason.HUMAN_ONLY, model=None,
        latency_ms=0.0, automation=p.AutomationLevel.HUMAN_ONLY, mode=p.DeploymentMode.NONE,
    )


def review(part_id: str) -> ReviewItem:
    return ReviewItem(
        part_id=part_id, created=datetime(2026, 1, 2, tzinfo=UTC), reason="human_only",
        automation="human_only", suggestion=None, confidence=None, model_label=None,
        candidate_label=None, active_version="1.0.0", candidate_version=None,
        image_jpeg=b"\xff\xd8jpeg",
    )


@pytest.fixture
def store(tmp_data_dir: Path) -> Iterator[StationStore]:
    with StationStore(tmp_data_dir) as opened:
        yield opened


def test_a_review_is_stored_after_the_decision_before_it(store: StationStore) -> None:
    seen: list[str] = []
    reports: list[str | None] = []
    writer = DurableWriter(store, on_reviews=reports.append)
    try:
        def build() -> ReviewItem:
            # The decision submitted before this review is already committed.
            seen.append(f"outbox depth {store.outbox_depth()}")
            return review("p1")

        writer.enqueue(TOPIC, 1, lambda seq: decision("p1").model_copy(update={"seq": seq}))
        writer.review(build)
        writer.review(lambda: None)  # nothing to queue: skipped
        assert writer.flush()
    finally:
        writer.close()
    assert seen == ["outbox depth 1"]
    assert store.review_count() == 1
    assert reports == [None]


def test_a_failing_review_store_is_reported_and_the_writer_goes_on(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[str | None] = []
    writer = DurableWriter(store, on_reviews=reports.append)

    def disk_full(items: list[ReviewItem]) -> list[bool]:
        raise OSError(28, "No space left on device")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(store, "add_reviews", disk_full)
            writer.review(lambda: review("p1"))
            assert writer.flush()

        def broken() -> ReviewItem:
            raise ValueError("cannot encode")

        writer.review(broken)
        writer.review(lambda: review("p2"))
        assert writer.flush()
    finally:
        writer.close()
    assert reports[0] is not None and "No space left" in reports[0]
    assert reports[1:] == [None]
    assert store.review("p2") is not None
    assert store.review("p1") is None


def shadow(part_id: str) -> Callable[[int], p.Envelope]:
    ref = p.ModelRef(name="m", version="1.0.0", sha256="a" * 64)
    opinion = p.ModelOpinion(model=ref, label="good", confidence=0.9, latency_ms=1.0)

    def build(seq: int) -> p.Envelope:
        return p.ShadowResult(
            station=STATION, seq=seq, part_id=part_id, mode=p.DeploymentMode.SHADOW,
            active=opinion, candidate=opinion, agree=True,
        )

    return build


def test_a_lazy_message_rides_the_next_urgent_commit(store: StationStore) -> None:
    stored: list[p.Envelope | Exception] = []
    writer = DurableWriter(store, lazy_s=30.0)
    try:
        writer.enqueue(SHADOW, 1, shadow("p1"), after=stored.append, urgent=False)
        time.sleep(0.1)
        assert store.outbox_depth() == 0  # waiting for company, not lost
        writer.enqueue(TOPIC, 1, lambda seq: decision("p2").model_copy(update={"seq": seq}),
                       after=stored.append)
        assert writer.flush()
    finally:
        writer.close()
    assert [type(m).__name__ for m in stored] == ["ShadowResult", "Decision"]
    assert [row.seq for row in store.pending()] == [0, 1]


def test_a_lazy_message_alone_is_committed_after_lazy_s(store: StationStore) -> None:
    done = threading.Event()
    writer = DurableWriter(store, lazy_s=0.05)
    try:
        writer.enqueue(SHADOW, 1, shadow("p1"), after=lambda _: done.set(), urgent=False)
        assert done.wait(10.0)
        assert store.outbox_depth() == 1
    finally:
        writer.close()


def test_closing_commits_what_is_waiting(tmp_data_dir: Path) -> None:
    with StationStore(tmp_data_dir) as store:
        writer = DurableWriter(store, lazy_s=30.0)
        writer.enqueue(SHADOW, 1, shadow("p1"), urgent=False)
        writer.close()
        assert store.outbox_depth() == 1
