"""External triggers on a live camera while NTP steps the station's wall clock.

A trigger is served by the first frame captured after it. The station's wall clock can jump an
hour either way (NTP after a long time offline, a daylight-saving mistake by hand); which frame
came after which trigger must not change with it. The camera is a fake capture read by the real
reader thread; the wall clock every part of the sources module reads is stepped by the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.sources import (
    Frame,
    LatestFrameReader,
    SourceOptions,
    TriggeredSource,
    open_source,
    parse_source,
    parse_spec,
)
from tests.unit.test_sources import FakeCamera, solid, wait_until

WAIT_S = 5.0
HOUR = 3600.0


class SteppedWallClock:
    """The machine's clocks, with a wall clock the test can step like NTP does."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()

    def step(self, seconds: float) -> None:
        with self._lock:
            self.offset += seconds

    def time(self) -> float:
        with self._lock:
            return time.time() + self.offset

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


@pytest.fixture
def camera() -> Iterator[FakeCamera]:
    fake = FakeCamera()
    yield fake
    fake.shut = True


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> SteppedWallClock:
    clock = SteppedWallClock()
    monkeypatch.setattr(sources, "time", clock)
    return clock


def station_source(
    camera: FakeCamera, trigger_timeout_s: float = 2.0
) -> tuple[TriggeredSource, LatestFrameReader]:
    """What a station with ``trigger: external`` reads (the test's `wall` fixture steps the
    wall clock it sees). The stream
    is reopened only after 5 s without a frame, so that a camera silent for a trigger's whole
    wait stays on the same connection."""
    reader = LatestFrameReader(
        camera.open, name="camera:0", station="st-1", stale_after_s=5.0,
        reconnect_min_s=0.01, reconnect_max_s=0.05,
    )
    source = TriggeredSource(reader, mode="external", trigger_timeout_s=trigger_timeout_s)
    assert wait_until(lambda: len(camera.captures) == 1)
    return source, reader


def capture(camera: FakeCamera, reader: LatestFrameReader, *values: int) -> None:
    """The camera delivers frames showing ``values``; returns once the reader has them all."""
    expected = reader.frames_captured + len(values)
    for value in values:
        camera.push(solid(value))
    assert wait_until(lambda: reader.frames_captured == expected)


def parts(source: TriggeredSource, count: int) -> list[tuple[str, int]]:
    read = [source.read(WAIT_S) for _ in range(count)]
    return [(f.part_id, f.seq) for f in read if f is not None]


def test_a_trigger_waiting_while_the_clock_steps_back_gets_its_frame(
    camera: FakeCamera, wall: SteppedWallClock
) -> None:
    source, reader = station_source(camera)
    try:
        capture(camera, reader, 1, 2)
        source.trigger("A")
        triggered_at = wall.time()
        wall.step(-HOUR)  # NTP steps the clock back while the trigger waits
        capture(camera, reader, 3)
        part = source.read(WAIT_S)
        assert part is not None, "the trigger's frame was not recognised as coming after it"
        assert (part.part_id, part.seq) == ("A", 3)
        assert source.missed_triggers == 0
        # The wall time still dates the part (and its messages): the clock as it is now.
        assert part.captured_at < triggered_at - HOUR / 2
    finally:
        camera.shut = True
        source.close()


def test_after_a_step_back_a_busy_station_judges_each_part_on_its_own_frame(
    camera: FakeCamera, wall: SteppedWallClock
) -> None:
    """A trigger that legitimately got no frame (the camera silent) while the clock stepped back
    must not stop the frames of the next triggers being kept: the station, busy, would judge
    each later part on the newest frame when it gets to it instead of the frame after its
    trigger."""
    source, reader = station_source(camera, trigger_timeout_s=1.0)
    try:
        capture(camera, reader, 1)  # a frame of no part
        source.trigger("A")
        wall.step(-HOUR)
        # The camera sends nothing for A within the trigger's wait: A is missed, as it should be.
        assert wait_until(lambda: source.read(0.0) is None and source.missed_triggers == 1)
        source.trigger("B")
        capture(camera, reader, 2, 3)
        source.trigger("C")
        capture(camera, reader, 4, 5)  # the station is busy all this time
        assert parts(source, 2) == [("B", 2), ("C", 4)]
        assert source.missed_triggers == 1
    finally:
        camera.shut = True
        source.close()


def test_a_frame_from_before_the_trigger_is_not_its_part_after_a_step_back(
    camera: FakeCamera, wall: SteppedWallClock
) -> None:
    """Frames captured before the clock stepped back carry later wall times than a trigger that
    comes after the step: they still show what was in front of the camera before the part."""
    source, reader = station_source(camera)
    try:
        capture(camera, reader, 1, 2)
        wall.step(-HOUR)
        source.trigger("A")
        capture(camera, reader, 3)
        assert parts(source, 1) == [("A", 3)]
    finally:
        camera.shut = True
        source.close()


def test_a_frame_in_time_is_kept_for_a_busy_station_after_a_step_forward(
    camera: FakeCamera, wall: SteppedWallClock
) -> None:
    """The trigger's frame came at once, the clock then read an hour later, and the station was
    busy for longer than the trigger's wait (``stale_after_s``): the part is judged on that frame,
    not counted missed."""
    source, reader = station_source(camera, trigger_timeout_s=1.0)
    try:
        source.trigger("A")
        wall.step(HOUR)
        capture(camera, reader, 1)
        time.sleep(1.5)  # busy judging an earlier part for longer than the trigger's wait
        assert parts(source, 1) == [("A", 1)]
        assert source.missed_triggers == 0
    finally:
        camera.shut = True
        source.close()


def test_every_nth_frame_is_unaffected_by_a_clock_step(
    camera: FakeCamera, wall: SteppedWallClock
) -> None:
    source = parse_source(
        "camera:0", station="st-1", options=SourceOptions(trigger="every_nth", every_nth=2),
        capture_factory=camera.open,
    )
    assert isinstance(source, TriggeredSource) and isinstance(source.inner, LatestFrameReader)
    reader = source.inner
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        seen: list[int] = []
        for value in range(1, 7):
            if value == 3:
                wall.step(-HOUR)
            if value == 5:
                wall.step(2 * HOUR)
            capture(camera, reader, value)
            frame = source.read(WAIT_S) if value % 2 else source.read(0.1)
            if frame is not None:
                seen.append(frame.seq)
        assert seen == [1, 3, 5]
    finally:
        camera.shut = True
        source.close()


def test_file_and_synthetic_frames_carry_both_capture_times(
    tmp_path: Path, wall: SteppedWallClock
) -> None:
    """Every frame says when it was captured on both clocks: the wall time dates the part, the
    monotonic time orders it against triggers. A wall clock stepped back changes only the
    former."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 5, (16, 16))
    writer.write(np.zeros((16, 16, 3), np.uint8))
    writer.release()
    opened = [
        open_source(parse_spec(spec), station="st-1")
        for spec in (f"folder:{tmp_path}", f"video:{video}", "synthetic:seed=3")
    ]
    before = time.monotonic()
    wall.step(-HOUR)
    frames: list[Frame | None] = [source.read(WAIT_S) for source in opened]
    for source in opened:
        source.close()
    after = time.monotonic()
    for frame in frames:
        assert frame is not None
        assert before <= frame.captured_mono <= after
        assert frame.captured_at < time.time() - HOUR / 2
