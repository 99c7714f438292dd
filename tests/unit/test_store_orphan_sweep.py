"""The orphan-image sweep against review items still being stored.

The agent's housekeeping thread sweeps the image folder every minute (`enforce_quota`) while
its writer thread stores review items (`add_reviews`): an image is written to a temporary
file, renamed into place, then its row commits. A file no row names is deleted once its
modification time is 10 minutes behind the wall clock; a commit held up that long (a hung
disk) or a wall clock stepped forward (NTP at boot on a station without a clock battery, a
file server whose clock is behind) makes an image still being stored look like a leftover.
A real store on a real folder; the hung disk is an fsync that waits for the test, the stepped
clock is the file's time set an hour back.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent import store as store_module
from edge_agent.store import ReviewItem, StationStore
from linesight.fsync import fsync_path

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
JPEG = b"\xff\xd8 a part under review"
AN_HOUR = 3600.0


@pytest.fixture
def store(tmp_data_dir: Path) -> Iterator[StationStore]:
    with StationStore(tmp_data_dir) as opened:
        yield opened


def held(part_id: str) -> ReviewItem:
    return ReviewItem(
        part_id=part_id, created=T0, reason="low_confidence", automation="partial",
        suggestion="ok", confidence=0.55, model_label="ok", candidate_label=None,
        active_version="1.0.0", candidate_version=None, image_jpeg=JPEG,
    )


def age_every_file(folder: Path, seconds: float) -> None:
    """What a wall clock stepped forward by `seconds` does to the files written before it."""
    then = time.time() - seconds
    for path in folder.iterdir():
        os.utime(path, (then, then))


def an_old_orphan(store: StationStore) -> Path:
    """A file left by a crash of an earlier run: the sweep must still delete it."""
    orphan = store.images_dir / ("0" * 64 + ".jpg")
    orphan.write_bytes(JPEG)
    return orphan


class HeldWriter:
    """`add_reviews` on a thread of its own (the agent's writer thread)."""

    def __init__(self, store: StationStore, item: ReviewItem) -> None:
        self.result: list[bool] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(store, item), name="writer")
        self._thread.start()

    def _run(self, store: StationStore, item: ReviewItem) -> None:
        try:
            self.result = store.add_reviews([item])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.result = exc

    def join(self) -> list[bool] | BaseException | None:
        self._thread.join(10)
        assert not self._thread.is_alive(), "add_reviews did not finish"
        return self.result


def hang_on_writer_thread(
    real: Callable[[int], None], entered: threading.Event, release: threading.Event
) -> Callable[[int], None]:
    """An fsync that hangs (until the test releases it) on the writer thread only."""

    def fsync(fd: int) -> None:
        if threading.current_thread().name == "writer":
            entered.set()
            release.wait(10)
        real(fd)

    return fsync


def assert_reviewable_with_its_image(store: StationStore, part_id: str) -> None:
    path = store.image_path(part_id)
    assert path is not None, "the part's row names no image"
    assert path.is_file(), "the part is in the review queue, its image is gone"
    assert path.read_bytes() == JPEG


def test_the_sweep_spares_an_image_whose_commit_hangs(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed into place, its row not committed yet: the disk hangs in the folder's fsync."""
    entered, release = threading.Event(), threading.Event()

    def hung_fsync_path(path: Path) -> None:
        entered.set()
        release.wait(10)
        fsync_path(path)

    monkeypatch.setattr(store_module, "fsync_path", hung_fsync_path)
    writer = HeldWriter(store, held("p-1"))
    try:
        assert entered.wait(10)
        orphan = an_old_orphan(store)
        age_every_file(store.images_dir, AN_HOUR)  # hung for an hour, or the clock stepped
        report = store.enforce_quota(10**9)  # the housekeeping thread, meanwhile
    finally:
        release.set()
    assert writer.join() == [True]
    assert_reviewable_with_its_image(store, "p-1")
    assert report.orphans_removed == 1 and not orphan.exists(), "a real orphan is still swept"


def test_the_sweep_spares_a_temporary_image_whose_fsync_hangs(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written, not renamed yet: the disk hangs in the image's own fsync."""
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(os, "fsync", hang_on_writer_thread(os.fsync, entered, release))
    writer = HeldWriter(store, held("p-1"))
    try:
        assert entered.wait(10)
        age_every_file(store.images_dir, AN_HOUR)
        store.enforce_quota(10**9)
    finally:
        release.set()
    result = writer.join()
    assert result == [True], f"the part was not queued for review: {result!r}"
    assert_reviewable_with_its_image(store, "p-1")


def test_the_sweep_spares_an_image_committed_while_it_scans_the_folder(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lock held by anyone: the writer commits between the sweep's look at the rows and its
    look at the folder, an image written before the wall clock stepped an hour forward."""
    real_scandir = os.scandir
    stored: list[list[bool]] = []

    def scandir_after_a_commit(path: Path) -> object:
        if not stored:
            stored.append(store.add_reviews([held("p-1")]))
            age_every_file(store.images_dir, AN_HOUR)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_a_commit)  # the store's own os module
    store.enforce_quota(10**9)
    assert stored == [[True]]
    assert_reviewable_with_its_image(store, "p-1")


def test_an_image_the_full_disk_refuses_leaves_no_row_and_no_file(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reverse: a row is never committed for an image that was not written. The batch
    fails as a whole (the writer reports it as the review_store fault) and leaves nothing."""
    real_fsync = os.fsync
    calls: list[int] = []

    def full_on_the_second_image(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_the_second_image)
    with pytest.raises(OSError, match="No space left"):
        store.add_reviews([held("p-1"), held("p-2")])
    monkeypatch.undo()
    assert store.review("p-1") is None and store.review("p-2") is None
    assert list(store.images_dir.iterdir()) == []
    assert store.add_reviews([held("p-1"), held("p-2")]) == [True, True], "space freed: stored"
    assert_reviewable_with_its_image(store, "p-2")
