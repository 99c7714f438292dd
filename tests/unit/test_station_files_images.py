"""Review images on the station's disk against the rows that name them: the quota counts what
is really on disk, and a part whose image is gone stays reviewable. A real store on a real
folder; files are removed or cut the way a technician freeing space, or a damaged disk, would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.store import ReviewItem, StationStore

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    with StationStore(tmp_path / "station") as opened:
        yield opened


def held(part_id: str, minute: int, size: int) -> ReviewItem:
    return ReviewItem(
        part_id=part_id, created=T0 + timedelta(minutes=minute), reason="low_confidence",
        automation="partial", suggestion="ok", confidence=0.55, model_label="ok",
        candidate_label=None, active_version="1.0.0", candidate_version=None,
        image_jpeg=b"\xff\xd8" + bytes(size - 2),
    )


def image_file(store: StationStore, part_id: str) -> Path:
    path = store.image_path(part_id)
    assert path is not None and path.is_file()
    return path


def test_images_removed_from_the_disk_no_longer_count_against_the_quota(
    store: StationStore,
) -> None:
    """A technician who deletes review images to free a full disk must not leave the station
    with a `review_quota_exceeded` fault (a failed guard for any rollout) that nothing clears
    until the operators have judged every part whose image is gone."""
    for i in range(3):
        store.add_review(held(f"p{i}", i, 100_000))
    assert store.enforce_quota(150_000).over_quota_unconfirmed == 2
    image_file(store, "p0").unlink()
    image_file(store, "p1").unlink()
    report = store.enforce_quota(150_000)
    assert report.bytes_used == 100_000, "only p2's image is still on the disk"
    assert not report.over_quota and report.over_quota_unconfirmed == 0


def test_an_image_cut_short_counts_for_what_it_holds(store: StationStore) -> None:
    """A file whose size on disk is not what its row recorded (cut short by a damaged disk)
    counts for its real size."""
    store.add_review(held("p0", 0, 100_000))
    store.add_review(held("p1", 1, 100_000))
    with image_file(store, "p0").open("r+b") as cut:
        cut.truncate(10_000)
    report = store.enforce_quota(150_000)
    assert report.bytes_used == 110_000 and not report.over_quota


def test_a_part_whose_image_is_gone_is_still_reviewable_and_its_row_is_pruned_later(
    store: StationStore,
) -> None:
    store.add_review(held("p0", 0, 5_000))
    store.add_review(held("p1", 1, 5_000))
    image_file(store, "p0").unlink()
    store.enforce_quota(1)
    assert [row.part_id for row in store.pending_reviews()] == ["p0", "p1"]
    store.record_verdict("p0", "ana", "pass", "ok", T0 + timedelta(hours=1))
    judged = store.review("p0")
    assert judged is not None and judged.outcome == "pass"
    report = store.enforce_quota(1)
    assert report.pruned_confirmed == 1 and store.image_path("p0") is None
    assert report.bytes_used == 5_000 and report.over_quota_unconfirmed == 1
    assert image_file(store, "p1").stat().st_size == 5_000, "an unjudged part's image stays"
