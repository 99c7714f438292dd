"""A live HTTP MJPEG camera, served by the test itself and read through OpenCV's FFmpeg backend,
that goes away while the station is busy: the frame it sent last is not a part any more."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest

from edge_agent.sources import (
    Frame,
    LatestFrameReader,
    SourceOptions,
    TriggeredSource,
    parse_source,
)
from tests.support import MjpegCamera

WAIT_S = 10.0

pytestmark = pytest.mark.skipif(
    "FFMPEG:                      YES" not in cv2.getBuildInformation(),
    reason="this OpenCV build has no FFmpeg backend for network streams",
)

# Backoff 0.1, 0.2, 0.4, 0.4 s: four reopen attempts take 1.1 s, more than stale_after_s.
OPTIONS = SourceOptions(stale_after_s=0.8, reconnect_min_s=0.1, reconnect_max_s=0.4)
ATTEMPTS_PAST_STALE = 4


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def jpeg(n: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.full((48, 64, 3), n % 256, np.uint8))
    assert ok
    return encoded.tobytes()


@pytest.fixture
def cameras() -> Iterator[list[MjpegCamera]]:
    started: list[MjpegCamera] = []
    yield started
    for camera in started:
        camera.stop()


def read_frame(source: TriggeredSource) -> Frame:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        frame = source.read(0.5)
        if frame is not None:
            return frame
    raise AssertionError("no frame from the MJPEG stream")


def test_the_last_frame_of_a_dropped_stream_is_not_a_part_after_a_busy_spell(
    cameras: list[MjpegCamera],
) -> None:
    """The station is busy (a slow part, a model loading) while the camera goes away. Before,
    its next read handed on the frame the camera sent last, seconds old, as the newest part:
    judged and signalled to the reject gate long after that part had passed it."""
    cameras.append(MjpegCamera(jpeg))
    source = parse_source(cameras[0].url, station="st-it", options=OPTIONS)
    assert isinstance(source, TriggeredSource)
    reader = source.inner
    assert isinstance(reader, LatestFrameReader)
    try:
        read_frame(source)
        # Busy: frames arrive that the station does not read, then the camera is gone.
        captured = reader.frames_captured
        assert wait_until(lambda: reader.frames_captured >= captured + 3)
        cameras[0].stop()
        assert wait_until(lambda: reader.reconnect_attempts >= ATTEMPTS_PAST_STALE)
        assert not reader.connected
        assert source.read(0.2) is None
        assert reader.frames_captured > captured  # the frames it had were not handed on

        # The camera is back: what the station gets now is a frame of the new connection.
        back_at = time.monotonic()
        cameras.append(MjpegCamera(jpeg, cameras[0].port))
        frame = read_frame(source)
        assert frame.captured_mono >= back_at
        assert reader.reconnects == 1
    finally:
        started = time.monotonic()
        source.close()
        assert time.monotonic() - started < 3.0
