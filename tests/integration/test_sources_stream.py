"""A live HTTP MJPEG stream, served by the test itself, read through OpenCV's FFmpeg backend:
frames flow, the stream drops, the reader keeps trying, the stream returns, frames flow again."""

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


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def gray_camera(port: int = 0) -> MjpegCamera:
    """Each frame is a solid gray whose level is the frame counter (mod 256), so a test can
    tell which frame it got."""

    def frame(n: int) -> bytes:
        ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), n % 256, np.uint8))
        assert ok
        return jpeg.tobytes()

    return MjpegCamera(frame, port)


@pytest.fixture
def server() -> Iterator[list[MjpegCamera]]:
    # A list: the test replaces the server when it restarts it.
    running = [gray_camera()]
    yield running
    running[-1].stop()


def read_frames(source: TriggeredSource, count: int) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + WAIT_S
    while len(frames) < count and time.monotonic() < deadline:
        frame = source.read(0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def level(frame: Frame) -> int:
    return round(float(frame.image.mean()))


def test_stream_drops_and_comes_back(server: list[MjpegCamera]) -> None:
    options = SourceOptions(reconnect_min_s=0.1, reconnect_max_s=0.4, stale_after_s=1.0)
    source = parse_source(server[0].url, station="st-it", options=options)
    assert isinstance(source, TriggeredSource)
    reader = source.inner
    assert isinstance(reader, LatestFrameReader)
    try:
        frames = read_frames(source, 5)
        assert len(frames) == 5, "no frames from the MJPEG stream"
        assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
        seqs = [f.seq for f in frames]
        assert seqs == sorted(set(seqs))
        assert len({f.part_id for f in frames}) == 5

        # A station busy for a while gets the newest frame, not the oldest buffered one.
        time.sleep(0.5)
        sent = server[0].sent
        frame = source.read(1.0)
        assert frame is not None
        assert abs(level(frame) - sent % 256) <= 4
        assert reader.dropped > 0

        # The camera goes away: no frames, and the reader keeps trying.
        server[0].stop()
        drain_deadline = time.monotonic() + WAIT_S
        while source.read(0.3) is not None:
            assert time.monotonic() < drain_deadline
        assert wait_until(lambda: reader.reconnect_attempts >= 2)
        assert source.read(0.2) is None
        assert not reader.connected

        # The camera is back on the same address: frames flow again.
        server.append(gray_camera(server[0].port))
        frames = read_frames(source, 3)
        assert len(frames) == 3, "no frames after the stream came back"
        assert source.reconnects >= 1
        assert reader.connected
        assert source.frame_age_s < 1.0
    finally:
        started = time.monotonic()
        source.close()
        assert time.monotonic() - started < 3.0


def test_a_url_with_an_upper_case_scheme_is_read(server: list[MjpegCamera]) -> None:
    """Schemes are case-insensitive (RFC 3986), FFmpeg's protocol names are not."""
    url = server[0].url.replace("http://", "HTTP://", 1)
    source = parse_source(url, station="st-it", options=SourceOptions(stale_after_s=1.0))
    try:
        assert len(read_frames(source, 2)) == 2, "no frames from an HTTP:// URL"
    finally:
        source.close()
