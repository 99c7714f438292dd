"""What a live source holds in memory, and how it turns deep camera frames into 8 bit.

With external triggers the reader keeps the first frame after each trigger until the station
takes it. A station busy for a while (a slow part, a model being loaded) on a 12-megapixel
camera must not hold gigabytes of frames: the held frames keep to a memory budget, and a trigger
whose frame had to be let go is counted as missed, never served with another part's frame.
The camera is a fake capture read by the real reader thread; its 12-megapixel frames are
broadcast views, so they weigh 36 MB each to the reader while costing the test nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.sources import (
    Frame,
    LatestFrameReader,
    SourceError,
    SourceOptions,
    TriggeredSource,
    open_source,
    parse_source,
    parse_spec,
    to_bgr,
)
from tests.unit.test_sources import FakeCamera, wait_until

pytestmark = pytest.mark.unit

MIB = 2**20
TWELVE_MEGAPIXELS = (3000, 4000, 3)  # 36 MB as BGR


def big_frame(value: int, shape: tuple[int, ...] = TWELVE_MEGAPIXELS) -> np.ndarray:
    """A frame of ``shape`` whose every pixel is ``value``, without allocating it."""
    return np.broadcast_to(np.full((1,) * len(shape), value, np.uint8), shape)


@pytest.fixture
def camera() -> Iterator[FakeCamera]:
    fake = FakeCamera()
    yield fake
    fake.shut = True


def external_camera(camera: FakeCamera, **options: Any) -> tuple[TriggeredSource,
                                                                  LatestFrameReader]:
    source = parse_source(
        "camera:0", station="st-1", options=SourceOptions(trigger="external", **options),
        capture_factory=camera.open,
    )
    assert isinstance(source, TriggeredSource)
    assert isinstance(source.inner, LatestFrameReader)
    assert wait_until(lambda: len(camera.captures) == 1)
    return source, source.inner


def frame_bytes_held(reader: LatestFrameReader) -> int:
    """Bytes of the distinct frames the reader's containers refer to (held and newest)."""
    seen: dict[int, int] = {}

    def visit(item: Any) -> None:
        if isinstance(item, np.ndarray):
            seen[id(item)] = item.nbytes
        elif isinstance(item, list | tuple | deque):
            for element in item:
                visit(element)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            for field in dataclasses.fields(item):
                visit(getattr(item, field.name))

    for value in vars(reader).values():
        visit(value)
    return sum(seen.values())


def capture(camera: FakeCamera, reader: LatestFrameReader, frame: np.ndarray) -> None:
    expected = reader.frames_captured + 1
    camera.push(frame)
    assert wait_until(lambda: reader.frames_captured == expected)


def test_a_busy_station_holds_no_more_frames_than_the_memory_budget(
    camera: FakeCamera, caplog: pytest.LogCaptureFixture
) -> None:
    """20 triggers while the station is busy, each with its 12-megapixel frame: by default at
    most 256 MiB of them are held (7 frames), the older triggers are counted as missed and
    named in the log, and each trigger the station still gets is served by its own frame."""
    source, reader = external_camera(camera)
    caplog.set_level(logging.WARNING, logger="edge_agent.sources")
    try:
        for number in range(1, 21):
            source.trigger(f"P{number}")
            capture(camera, reader, big_frame(number))
            # The budget, and the newest frame on top of it.
            assert frame_bytes_held(reader) <= 256 * MIB + big_frame(0).nbytes
        parts = [source.read(1.0) for _ in range(7)]
        served = [(p.part_id, int(p.image[0, 0, 0])) for p in parts if p is not None]
        assert served == [(f"P{n}", n) for n in range(14, 21)]
        assert source.missed_triggers == 13
        assert source.pending_triggers == 0
        assert reader.held_bytes == 0 and frame_bytes_held(reader) <= big_frame(0).nbytes
        assert "P1:" in caplog.text and "P13:" in caplog.text and "P14:" not in caplog.text
        # Caught up: the next trigger gets its frame as usual.
        source.trigger("P21")
        capture(camera, reader, big_frame(21))
        part = source.read(1.0)
        assert part is not None and (part.part_id, int(part.image[0, 0, 0])) == ("P21", 21)
    finally:
        camera.shut = True
        source.close()


def test_the_budget_is_a_source_option_and_one_frame_is_always_held(
    camera: FakeCamera,
) -> None:
    """A budget smaller than one frame still holds the newest trigger's frame: a station that
    is never busy for long inspects every part."""
    source, reader = external_camera(camera, held_frames_mb=1)
    try:
        source.trigger("A")
        capture(camera, reader, big_frame(1))
        source.trigger("B")
        capture(camera, reader, big_frame(2))
        assert reader.held_bytes == big_frame(2).nbytes
        part = source.read(1.0)
        assert part is not None and (part.part_id, int(part.image[0, 0, 0])) == ("B", 2)
        assert source.missed_triggers == 1
        source.trigger("C")
        capture(camera, reader, big_frame(3))
        part = source.read(1.0)
        assert part is not None and (part.part_id, int(part.image[0, 0, 0])) == ("C", 3)
        assert source.missed_triggers == 1
    finally:
        camera.shut = True
        source.close()


def test_the_frame_limit_counts_the_trigger_it_lets_go(camera: FakeCamera) -> None:
    """More than 64 small frames held: the oldest goes, and so does its trigger, counted once."""
    source, reader = external_camera(camera)
    try:
        for number in range(1, 67):
            source.trigger(f"P{number}")
            capture(camera, reader, big_frame(number % 256, (4, 4, 3)))
        assert source.missed_triggers == 2
        parts = [source.read(1.0) for _ in range(64)]
        assert [p.part_id for p in parts if p is not None] == [f"P{n}" for n in range(3, 67)]
        assert source.missed_triggers == 2
    finally:
        camera.shut = True
        source.close()


class LettingGoSource:
    """A live source whose held frame for a trigger was let go while the station was reading:
    `take_unheld` reports those triggers' times, `read` hands on the next held frame."""

    def __init__(self, frames: list[Frame], unheld: list[float]) -> None:
        self.frames = frames
        self.unheld = unheld
        self.reconnects = 0
        self.frame_age_s = 0.0

    def read(self, timeout: float) -> Frame | None:
        return self.frames.pop(0) if self.frames else None

    def take_unheld(self) -> list[float]:
        taken, self.unheld = self.unheld, []
        return taken

    def close(self) -> None:
        pass


def test_a_frame_let_go_during_the_read_serves_the_next_trigger_not_the_wrong_one() -> None:
    clock = [100.0]
    frame_of_b = Frame("cam-2", big_frame(2, (4, 4, 3)), 0.0, seq=2, captured_mono=100.6)
    inner = LettingGoSource([frame_of_b], unheld=[])
    source = TriggeredSource(inner, mode="external", monotonic=lambda: clock[0])
    source.trigger("A")
    clock[0] = 100.5
    source.trigger("B")
    inner.unheld = [100.0]  # A's frame went while the station was waiting for it
    part = source.read(0.0)
    assert part is not None and (part.part_id, part.seq) == ("B", 2)
    assert (source.missed_triggers, source.pending_triggers) == (1, 0)


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("folder:x", {"held_frames_mb": 64}, "held_frames_mb"),
        ("synthetic:", {"held_frames_mb": 64}, "held_frames_mb"),
        ("camera:0", {"held_frames_mb": 64}, "trigger"),
        ("camera:0", {"trigger": "external", "held_frames_mb": 0}, "held_frames_mb"),
    ],
)
def test_the_budget_applies_to_externally_triggered_live_sources(
    spec: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(spec, SourceOptions.model_validate(options))


def test_an_external_trigger_takes_a_budget() -> None:
    options = SourceOptions(trigger="external", held_frames_mb=512)
    assert parse_spec("rtsp://cam/stream", options).options.held_frames_mb == 512


# --- deep frames -----------------------------------------------------------------------------


def test_twelve_bit_frames_fill_the_eight_bit_range_with_bit_depth() -> None:
    """12-bit sensor data in 16-bit words (0..4095): by the 16-bit rule it comes out nearly black
    (at most 15); with ``bit_depth: 12`` mid-grey stays mid-grey and white stays white."""
    frame = np.array([[0, 2048, 4095]], np.uint16)
    assert to_bgr(frame)[0, :, 0].tolist() == [0, 8, 15]
    assert to_bgr(frame, bit_depth=12)[0, :, 0].tolist() == [0, 128, 255]
    assert to_bgr(np.array([[1023]], np.uint16), bit_depth=10)[0, 0, 0] == 255
    # Data wider than bit_depth says saturates white instead of wrapping round to black.
    assert to_bgr(np.array([[4096, 65535]], np.uint16), bit_depth=12)[0, :, 0].tolist() == [
        255, 255]
    # 8-bit frames are untouched by it.
    assert to_bgr(np.full((2, 2), 77, np.uint8), bit_depth=12)[0, 0, 0] == 77


def test_a_twelve_bit_camera_is_seen_by_the_station(
    camera: FakeCamera, caplog: pytest.LogCaptureFixture
) -> None:
    source = parse_source(
        "camera:0", station="st-1", options=SourceOptions(bit_depth=12),
        capture_factory=camera.open,
    )
    caplog.set_level(logging.WARNING, logger="edge_agent.sources")
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(np.full((4, 6), 2048, np.uint16))
        frame = source.read(1.0)
        assert frame is not None and frame.image.shape == (4, 6, 3)
        assert int(frame.image[0, 0, 0]) == 128
        assert "bit_depth" not in caplog.text
        # A camera whose data is wider than bit_depth says: saturated, and said once.
        for _ in range(2):
            camera.push(np.full((4, 6), 40_000, np.uint16))
            frame = source.read(1.0)
            assert frame is not None and int(frame.image[0, 0, 0]) == 255
        warnings = [r.getMessage() for r in caplog.records if "bit_depth" in r.getMessage()]
        assert len(warnings) == 1 and "40000" in warnings[0]
    finally:
        camera.shut = True
        source.close()


@pytest.mark.parametrize(
    "raw", [np.zeros((1, 5000), np.uint8), np.zeros((4, 6, 2), np.uint8)], ids=["mjpg", "yuyv"]
)
def test_a_camera_in_a_colour_mode_with_bit_depth_is_a_clear_source_error(
    camera: FakeCamera, raw: np.ndarray
) -> None:
    """Taken raw, an MJPG frame is one row of compressed bytes and a YUYV one has 2 channels:
    neither is judged as a picture; the error says what the camera must give."""
    source = parse_source(
        "camera:0", station="st-1", options=SourceOptions(bit_depth=12),
        capture_factory=camera.open,
    )
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(raw)
        with pytest.raises(SourceError, match="camera:0: .*bit_depth 12 .*gray"):
            source.read(1.0)
    finally:
        camera.shut = True
        source.close()


@pytest.mark.parametrize("spec", ["rtsp://cam/stream", "http://cam/video.mjpg", "video:x.avi",
                                  "synthetic:"])
def test_bit_depth_is_refused_for_sources_that_never_give_deep_frames(spec: str) -> None:
    with pytest.raises(ValueError, match="bit_depth"):
        parse_spec(spec, SourceOptions(bit_depth=12))


@pytest.mark.parametrize("depth", [7, 17, 0])
def test_bit_depth_out_of_range_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="bit_depth"):
        SourceOptions(bit_depth=depth)


class RecordingCapture:
    """Stands in for ``cv2.VideoCapture``: records what the opener sets."""

    def __init__(self, *args: Any) -> None:
        self.props: dict[int, float] = {}

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)


def test_a_camera_with_bit_depth_hands_on_its_raw_deep_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenCV's own conversion of a 16-bit camera is the `>> 8` that blacks out 12-bit data:
    with ``bit_depth`` the station asks for the 16-bit gray mode, takes its frames raw and
    scales them itself."""
    monkeypatch.setattr(cv2, "VideoCapture", RecordingCapture)
    deep: Any = sources._camera_opener(0, SourceOptions(bit_depth=12))()
    assert deep.props.get(cv2.CAP_PROP_CONVERT_RGB) == 0.0
    assert deep.props.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter.fourcc(*"Y16 ")
    plain: Any = sources._camera_opener(0, SourceOptions())()
    assert cv2.CAP_PROP_CONVERT_RGB not in plain.props


def test_a_folder_of_12_bit_images_keeps_their_top_12_bits(tmp_path: Path) -> None:
    """A recording of a 12-bit camera saved as 16-bit PNGs: read as full 16-bit data, 4095 (the
    sensor's white) came out as 15 of 255, a nearly black part the model never saw in training."""
    ramp = np.tile(np.array([0, 1024, 2048, 4095], np.uint16), (4, 1))
    assert cv2.imwrite(str(tmp_path / "a.png"), ramp)
    (tmp_path / "b.png").write_bytes(cv2.imencode(".png", np.full((4, 4), 200, np.uint8))[1])

    def frames(options: SourceOptions) -> list[np.ndarray]:
        source = open_source(parse_spec(f"folder:{tmp_path}", options), station="press-01")
        try:
            return [source.read(1.0).image for _ in range(2)]  # type: ignore[union-attr]
        finally:
            source.close()

    deep, eight = frames(SourceOptions(bit_depth=12))
    assert deep.shape == (4, 4, 3) and deep[0, :, 0].tolist() == [0, 64, 128, 255]
    assert int(eight.max()) == 200  # an 8-bit image is taken as it is
    dark, _ = frames(SourceOptions())
    assert int(dark.max()) == 15  # without bit_depth: scaled as 16-bit data, nearly black
