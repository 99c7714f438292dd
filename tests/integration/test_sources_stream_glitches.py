"""An HTTP MJPEG camera, served by the test itself and read through OpenCV's FFmpeg backend, that
misbehaves the way cameras do over months: a corrupt frame now and then, a camera that stops
sending without closing the connection, a resolution changed mid-stream."""

from __future__ import annotations

import threading
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

OPTIONS = SourceOptions(stale_after_s=0.8, reconnect_min_s=0.1, reconnect_max_s=0.4)


def jpeg(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


def read_frames(source: TriggeredSource, count: int) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + WAIT_S
    while len(frames) < count and time.monotonic() < deadline:
        frame = source.read(0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def open_stream(camera: MjpegCamera) -> tuple[TriggeredSource, LatestFrameReader]:
    source = parse_source(camera.url, station="st-it", options=OPTIONS)
    assert isinstance(source, TriggeredSource)
    assert isinstance(source.inner, LatestFrameReader)
    return source, source.inner


@pytest.fixture
def cameras() -> Iterator[list[MjpegCamera]]:
    started: list[MjpegCamera] = []
    yield started
    for camera in started:
        camera.stop()


def serve(cameras: list[MjpegCamera], frame: Callable[[int], bytes]) -> MjpegCamera:
    camera = MjpegCamera(frame)
    cameras.append(camera)
    return camera


def test_a_corrupt_frame_now_and_then_does_not_drop_the_stream(
    cameras: list[MjpegCamera],
) -> None:
    """Before, each corrupt JPEG closed the connection: a reconnect, its lost frames and a
    warning for every bad frame of a cheap camera."""

    def frame(n: int) -> bytes:
        good = jpeg(np.full((48, 64, 3), 100, np.uint8))
        return good[: len(good) // 2] if n % 6 == 3 else good

    camera = serve(cameras, frame)
    source, reader = open_stream(camera)
    try:
        assert len(read_frames(source, 20)) == 20
        assert reader.reconnect_attempts == 0
        assert reader.failed_reads >= 2
        assert reader.connected
    finally:
        source.close()


def test_a_camera_that_stops_sending_without_closing_is_reopened(
    cameras: list[MjpegCamera],
) -> None:
    frozen = threading.Event()
    thawed = threading.Event()

    def frame(n: int) -> bytes:
        if frozen.is_set():
            thawed.wait()  # the connection stays open, nothing more comes
        return jpeg(np.full((48, 64, 3), n % 256, np.uint8))

    camera = serve(cameras, frame)
    source, reader = open_stream(camera)
    try:
        assert len(read_frames(source, 3)) == 3
        frozen.set()
        deadline = time.monotonic() + WAIT_S
        while reader.connected:
            source.read(0.1)
            assert time.monotonic() < deadline, "a silent stream still counts as connected"
        assert source.read(0.2) is None  # no frame, and the read does not block
        frozen.clear()
        thawed.set()
        frames = read_frames(source, 3)
        assert len(frames) == 3, "no frames after the camera sent again"
        assert reader.reconnects >= 1
        assert source.frame_age_s < OPTIONS.stale_after_s
    finally:
        thawed.set()
        source.close()


def test_a_resolution_change_mid_stream_keeps_the_frames_coming(
    cameras: list[MjpegCamera],
) -> None:
    """OpenCV's FFmpeg backend scales the new frames to the size the stream opened with (see
    docs/sources.md); the station keeps inspecting."""

    def frame(n: int) -> bytes:
        shape = (48, 64, 3) if n < 10 else (90, 160, 3)
        return jpeg(np.full(shape, 200 if n >= 10 else 50, np.uint8))

    camera = serve(cameras, frame)
    source, reader = open_stream(camera)
    try:
        frames = read_frames(source, 15)
        assert len(frames) == 15
        assert round(float(frames[-1].image.mean())) in range(195, 206)
        assert all(f.image.ndim == 3 and f.image.shape[2] == 3 for f in frames)
        assert reader.reconnect_attempts == 0
    finally:
        source.close()
