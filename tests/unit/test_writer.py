"""The group-commit writer: messages first, then what follows them, batch by batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.store import ReviewItem, StationStore
from edge_agent.writer import DurableWriter
from linesight import protocol as p

pytestmark = pytest.mark.unit

STATION = "st-1"
TOPIC = p.Topics().station(STATION, p.Channel.DECISION)


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
    assert reports[1] is not None and "cannot encode" in reports[1]
    assert reports[2:] in ([], [None]), "p2 stored (in the broken one's batch or its own)"
    assert store.review("p2") is not None
    assert store.review("p1") is None


def test_a_part_id_already_in_the_queue_is_reported_not_dropped_silently(
    store: StationStore,
) -> None:
    reports: list[str | None] = []
    writer = DurableWriter(store, on_reviews=reports.append)
    try:
        writer.review(lambda: review("p1"))
        assert writer.flush()
        writer.review(lambda: review("p2"))
        writer.review(lambda: review("p1"))  # a source that hands out an id again
        assert writer.flush()
    finally:
        writer.close()
    assert reports[0] is None
    assert reports[1] is not None
    assert "1 parts not queued for review" in reports[1] and "p1" in reports[1]
    assert store.review("p2") is not None and store.review_count() == 2


def test_the_reject_gate_hears_of_a_decision_before_review_images_are_written(
    store: StationStore,
) -> None:
    order: list[str] = []
    writer = DurableWriter(store)
    try:
        def build() -> ReviewItem:
            order.append("review image")
            return review("p1")

        writer.enqueue(TOPIC, 1, lambda seq: decision("p1").model_copy(update={"seq": seq}),
                       after=lambda _: order.append("decision stored"))
        writer.review(build)
        writer.later(lambda: order.append("task"))
        assert writer.flush()
    finally:
        writer.close()
    assert order == ["decision stored", "review image", "task"]


def test_the_relay_is_woken_once_per_commit_not_once_per_message(store: StationStore) -> None:
    commits: list[int] = []
    writer = DurableWriter(store, on_committed=lambda: commits.append(store.outbox_depth()))
    try:
        held = threading.Event()
        release = threading.Event()

        def hold() -> None:
            held.set()
            release.wait(10)

        writer.later(hold)  # a batch with no message: no wake-up
        assert held.wait(10)
        for n in range(10):  # all waiting while the writer is held: one batch
            writer.enqueue(TOPIC, 1, lambda seq, n=n: decision(f"p{n}").model_copy(
                update={"seq": seq}))
        release.set()
        assert writer.flush()
        writer.enqueue(TOPIC, 1, lambda seq: decision("p10").model_copy(update={"seq": seq}))
        assert writer.flush()
    finally:
        writer.close()
    assert commits == [10, 11], "one wake-up per commit, after the rows are stored"


def test_a_failed_commit_wakes_nobody(store: StationStore) -> None:
    commits: list[int] = []
    writer = DurableWriter(store, on_committed=lambda: commits.append(1))
    results: list[p.Envelope | Exception] = []

    def broken(seq: int) -> p.Envelope:
        raise ValueError("cannot build")

    try:
        writer.enqueue(TOPIC, 1, broken, after=results.append)
        assert writer.flush()
    finally:
        writer.close()
    assert len(results) == 1 and isinstance(results[0], Exception)
    assert commits == []


def test_a_review_item_that_cannot_be_built_is_reported_not_dropped_silently(
    store: StationStore,
) -> None:
    """The part was held for review: if it never reaches the queue, someone must hear of it,
    and a good item of the same batch must not clear the report."""
    reports: list[str | None] = []
    writer = DurableWriter(store, on_reviews=reports.append)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    def broken() -> ReviewItem:
        raise ValueError("cannot encode")

    try:
        writer.later(hold)
        assert held.wait(10)
        writer.review(broken)  # both in the batch after the held one
        writer.review(lambda: review("p2"))
        release.set()
        assert writer.flush()
        writer.review(broken)  # alone in its batch
        assert writer.flush()
    finally:
        writer.close()
    assert len(reports) == 2
    assert all(report is not None and "1 parts could not be queued for review" in report
               and "cannot encode" in report for report in reports), reports
    assert store.review("p2") is not None
