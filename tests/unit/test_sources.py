"""Frame sources and the part trigger, with fake captures and fake live sources."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.agent import trigger_part_id
from edge_agent.sources import (
    MAX_HUNG_CONNECTIONS,
    EndOfSource,
    Frame,
    FrameSource,
    LatestFrameReader,
    SourceError,
    SourceOptions,
    SyntheticSource,
    TriggeredSource,
    backoff_delay,
    file_part_id,
    pacing_step,
    parse_source,
    parse_spec,
    redact_url,
    to_bgr,
)
from edge_agent.synthetic import PartGenerator
from linesight.protocol import PART_ID_MAX_LENGTH

pytestmark = pytest.mark.unit

WAIT_S = 5.0


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def solid(value: int, shape: tuple[int, ...] = (8, 8, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


# --- specs and options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "target"),
    [
        ("camera:0", "camera", "0"),
        ("camera:/dev/video2", "camera", "/dev/video2"),
        ("rtsp://user:pw@10.0.0.5:554/stream1", "stream", "rtsp://user:pw@10.0.0.5:554/stream1"),
        ("http://cam.local/video.mjpg", "stream", "http://cam.local/video.mjpg"),
        ("HTTPS://cam.local/video.mjpg", "stream", "https://cam.local/video.mjpg"),
        ("Rtsp://u:P@Cam/Path", "stream", "rtsp://u:P@Cam/Path"),
        ("video:/data/line.avi", "video", "/data/line.avi"),
        ("folder:samples/parts", "folder", "samples/parts"),
        ("synthetic:", "synthetic", ""),
        ("  synthetic  ".strip() + ":", "synthetic", ""),
    ],
)
def test_good_specs_parse(spec: str, kind: str, target: str) -> None:
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.target) == (kind, target)
    assert parsed.is_live == (kind in ("camera", "stream"))


def test_synthetic_spec_options_override_the_station_options() -> None:
    base = SourceOptions(seed=1, size=64, defect_rate=0.5)
    parsed = parse_spec("synthetic:seed=7, rate=20,defect_rate=0.1", base)
    assert parsed.options.seed == 7
    assert parsed.options.rate_hz == 20.0
    assert parsed.options.defect_rate == 0.1
    assert parsed.options.size == 64  # not overridden: the station's value stays


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected one of"),
        ("webcam", "expected one of"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("camera:", "camera needs an index"),
        ("camera:front", "camera needs an index"),
        ("video:", "video needs a path"),
        ("folder:   ", "folder needs a path"),
        ("rtsp://", "needs a host"),
        ("http:///stream", "needs a host"),
        ("http:cam.local", "needs a host"),
        ("synthetic:speed=3", "unknown option 'speed'"),
        ("synthetic:seed", "expected key=value"),
        ("synthetic:seed=1,seed=2", "given twice"),
        ("synthetic:seed=-1", "seed"),
        ("synthetic:rate=0", "rate_hz"),
        ("synthetic:defect_rate=1.5", "defect_rate"),
        ("synthetic:size=abc", "size"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_password_never_appears_in_errors_or_names() -> None:
    assert redact_url("rtsp://admin:s3cret@cam:554/s") == "rtsp://admin:***@cam:554/s"
    assert redact_url("http://cam/s") == "http://cam/s"
    assert redact_url("http://cam:8080/s?user=a") == "http://cam:8080/s?user=a"
    assert redact_url("rtsp://admin:p@ss@cam/s") == "rtsp://admin:***@cam/s"
    assert redact_url("rtsp://admin:Cam#1@cam/s") == "rtsp://admin:***@cam/s"


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://admin:Cam#2024@10.0.0.5/stream",  # '#' starts a fragment
        "rtsp://admin:pa/ss@10.0.0.5/stream",  # '/' ends the host part
        "rtsp://admin:pa?ss@10.0.0.5/stream",  # '?' starts a query
    ],
)
def test_a_url_that_does_not_parse_is_rejected_without_its_password(url: str) -> None:
    """Left alone, such a URL never opens, and the password would be in every log line."""
    with pytest.raises(ValueError, match="percent-encoded") as error:
        parse_spec(url)
    assert "Cam#2024" not in str(error.value) and "pa/ss" not in str(error.value)
    assert "pa?ss" not in str(error.value)


def test_trigger_modes_apply_only_to_live_sources() -> None:
    with pytest.raises(ValueError, match="applies to live sources"):
        parse_spec("folder:x", SourceOptions(trigger="external"))
    assert parse_spec("camera:0", SourceOptions(trigger="external")).options.trigger == "external"


@pytest.mark.parametrize(
    "options",
    [
        {"colour": "bgr"},
        {"reconnect_min_s": 5, "reconnect_max_s": 1},
        {"every_nth": 0, "trigger": "every_nth"},
        {"every_nth": 5},
        {"stale_after_s": 0},
    ],
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SourceOptions.model_validate(options)


# --- pure helpers ----------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, 0.5, 10.0) for n in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert backoff_delay(10_000, 0.5, 10.0) == 10.0
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.5, 10.0)


def test_pacing_keeps_a_fixed_grid() -> None:
    # Unpaced: never wait.
    assert pacing_step(5.0, None, None) == (0.0, 5.0)
    # First frame at once, the next one period later.
    wait, due = pacing_step(100.0, None, 10.0)
    assert wait == 0.0
    assert due == pytest.approx(100.1)
    # Asked early: wait the rest of the period.
    wait, due2 = pacing_step(100.04, due, 10.0)
    assert wait == pytest.approx(0.06)
    assert due2 == pytest.approx(100.2)
    # A little late: no wait, and the grid holds (the average rate stays exact).
    wait, due3 = pacing_step(100.23, due2, 10.0)
    assert wait == 0.0
    assert due3 == pytest.approx(100.3)
    # Far behind: a new grid starts, no burst of catch-up frames.
    wait, due4 = pacing_step(105.0, due3, 10.0)
    assert wait == 0.0
    assert due4 == pytest.approx(105.1)


def test_frames_become_bgr_uint8() -> None:
    assert to_bgr(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert to_bgr(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5, 3)
    assert to_bgr(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    deep = to_bgr(np.full((2, 2), 0xFF00, np.uint16))
    assert deep.dtype == np.uint8
    assert int(deep[0, 0, 0]) == 0xFF
    with pytest.raises(SourceError):
        to_bgr(np.zeros((4, 5), np.float32))


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_source_is_deterministic_and_carries_truth() -> None:
    first = parse_source("synthetic:seed=3,size=64", station="st-1")
    second = parse_source("synthetic:seed=3,size=64", station="st-2")
    generator = PartGenerator(seed=3, size=64)
    for index in range(5):
        a, b = first.read(1.0), second.read(1.0)
        assert a is not None and b is not None
        assert a.part_id == b.part_id == generator.part(index).part_id
        assert np.array_equal(a.image, b.image)
        assert a.truth == (generator.part(index).defect or "ok")
    assert first.reconnects == 0 and first.frame_age_s == 0.0
    first.close()
    with pytest.raises(EndOfSource):
        first.read(0.1)


def test_a_synthetic_source_can_go_on_from_a_later_part() -> None:
    generator = PartGenerator(seed=3, size=32)
    frame = SyntheticSource(generator, start=40).read(1.0)
    assert frame is not None
    assert frame.part_id == generator.part(40).part_id == "syn-3-00000040"
    assert frame.seq == 40
    with pytest.raises(ValueError, match="start"):
        SyntheticSource(generator, start=-1)


def test_paced_source_returns_none_when_the_next_frame_is_not_due() -> None:
    source = SyntheticSource(PartGenerator(seed=0, size=32), rate_hz=0.01)
    assert source.read(0.0) is not None  # the first frame is due at once
    assert source.read(0.0) is None  # the next one in 100 s
    source.close()


# --- folder ----------------------------------------------------------------------------------


def without_time(part_id: str) -> str:
    """A file part id without its capture time: ``st-1-a-1700000000000-1`` -> ``st-1-a-1``."""
    head, _, count = part_id.rpartition("-")
    stem, _, millis = head.rpartition("-")
    assert millis.isdigit() and abs(int(millis) / 1000 - time.time()) < 600, part_id
    return f"{stem}-{count}"


def test_file_part_ids_differ_across_restarts_and_fit_the_contract() -> None:
    first = file_part_id("st-1", "a", 1_800_000_000.0, 1)
    assert first == "st-1-a-1800000000000-1"
    # A restarted station counts from 1 again: the capture time tells the parts apart.
    assert file_part_id("st-1", "a", 1_800_000_360.5, 1) != first
    long_station = "s" * 64
    long_id = file_part_id(long_station, "x" * 300, 1_800_000_000.0, 12345)
    assert len(long_id) == 128
    assert long_id.startswith(f"{long_station}-xxx") and long_id.endswith("-1800000000000-12345")


@pytest.fixture
def parts_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "parts"
    folder.mkdir()
    cv2.imwrite(str(folder / "b.png"), solid(20))
    cv2.imwrite(str(folder / "a.jpg"), solid(10))
    cv2.imwrite(str(folder / "c.bmp"), solid(30, (8, 8)))  # gray
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def read_all(source: FrameSource, limit: int = 100) -> list[Frame]:
    frames: list[Frame] = []
    with pytest.raises(EndOfSource):
        for _ in range(limit):
            frame = source.read(1.0)
            assert frame is not None
            frames.append(frame)
    return frames


def test_folder_reads_images_in_name_order_and_skips_unreadable(
    parts_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = parse_source(f"folder:{parts_folder}", station="st-1")
    with caplog.at_level(logging.WARNING):
        frames = read_all(source)
    assert [without_time(f.part_id) for f in frames] == ["st-1-a-1", "st-1-b-2", "st-1-c-3"]
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 30]
    assert all(f.image.shape == (8, 8, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.truth is None for f in frames)
    assert "broken.png" in caplog.text


def test_folder_loops_with_unique_part_ids(parts_folder: Path) -> None:
    looping = SourceOptions(loop=True)
    source = parse_source(f"folder:{parts_folder}", station="st-1", options=looping)
    frames = [source.read(1.0) for _ in range(7)]
    assert [int(f.image[0, 0, 0]) for f in frames if f] == [10, 20, 30, 10, 20, 30, 10]
    assert len({f.part_id for f in frames if f}) == 7


def test_folder_problems_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a directory"):
        parse_source(f"folder:{tmp_path / 'missing'}", station="st-1")
    with pytest.raises(SourceError, match="no images"):
        parse_source(f"folder:{tmp_path}", station="st-1")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    source = parse_source(f"folder:{tmp_path}", station="st-1", options=SourceOptions(loop=True))
    with pytest.raises(SourceError, match="no readable image"):
        source.read(1.0)


@pytest.mark.parametrize("gap", ["empty", "half-written", "half-written-jpeg"])
def test_a_looping_folder_recovers_when_readable_images_come_back(
    tmp_path: Path, gap: str
) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), solid(10))
    source = parse_source(f"folder:{tmp_path}", station="st-1", options=SourceOptions(loop=True))
    assert source.read(1.0) is not None
    (tmp_path / "a.png").unlink()
    suffix = ".jpg" if gap == "half-written-jpeg" else ".png"
    noisy = np.random.default_rng(2).integers(10, 31, (128, 128, 3), dtype=np.uint8)
    encoded = cv2.imencode(suffix, noisy)[1].tobytes()
    if gap.startswith("half-written"):  # a file still being copied in: not readable yet
        (tmp_path / f"b{suffix}").write_bytes(encoded[: len(encoded) * 2 // 3])
    for _ in range(3):  # the agent shows a source fault and tries again
        with pytest.raises(SourceError, match=str(tmp_path)):
            source.read(1.0)
    (tmp_path / f"b{suffix}").write_bytes(encoded)  # the copy is complete
    frames = [source.read(1.0) for _ in range(3)]
    assert [round(float(f.image.mean())) for f in frames if f] == [20, 20, 20]


def test_a_truncated_jpeg_is_skipped_not_judged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """libjpeg decodes a cut-off JPEG to a full-size picture, grey where the data is missing:
    judged, it would be a part inspected on half an image."""
    picture = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    encoded = cv2.imencode(".jpg", picture)[1].tobytes()
    whole = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    assert whole is not None
    (tmp_path / "a.jpg").write_bytes(encoded)
    (tmp_path / "b.jpg").write_bytes(encoded[: len(encoded) // 2])
    (tmp_path / "c.jpeg").write_bytes(encoded + b"\x00" * 16)  # bytes after the end: fine
    (tmp_path / "d.png").write_bytes(b"")  # just created by a copy
    source = parse_source(f"folder:{tmp_path}", station="st-1")
    with caplog.at_level(logging.WARNING):
        frames = read_all(source)
    assert [without_time(f.part_id) for f in frames] == ["st-1-a-1", "st-1-c-2"]
    assert all(np.array_equal(f.image, whole) for f in frames)
    assert source.skipped == 2  # type: ignore[attr-defined]
    assert "b.jpg" in caplog.text and "d.png: empty file" in caplog.text


# --- video file ------------------------------------------------------------------------------


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for index in range(6):
        writer.write(solid(index * 40, (48, 64, 3)))
    writer.release()
    return path


def test_video_file_round_trip(video_file: Path) -> None:
    frames = read_all(parse_source(f"video:{video_file}", station="st-1"))
    assert len(frames) == 6
    assert [without_time(f.part_id) for f in frames[:2]] == ["st-1-line-1", "st-1-line-2"]
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    # MJPG is lossy: compare brightness roughly.
    assert [round(float(f.image.mean()) / 40) for f in frames] == list(range(6))


def test_video_file_loops(video_file: Path) -> None:
    source = parse_source(f"video:{video_file}", station="st-1", options=SourceOptions(loop=True))
    frames = [source.read(1.0) for _ in range(14)]
    assert all(f is not None for f in frames)
    assert [round(float(f.image.mean()) / 40) for f in frames if f][5:8] == [5, 0, 1]
    source.close()


def test_video_file_problems_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        parse_source(f"video:{tmp_path / 'none.avi'}", station="st-1")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"0" * 64)
    with pytest.raises(SourceError, match="cannot open"):
        parse_source(f"video:{junk}", station="st-1")


# --- part trigger ----------------------------------------------------------------------------


class FakeLiveSource:
    """Hands on prepared frames in order, then None (no frame within the timeout)."""

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = list(frames)
        self.reconnects = 2
        self.frame_age_s = 0.25
        self.closed = False

    def read(self, timeout: float) -> Frame | None:
        return self.frames.pop(0) if self.frames else None

    def close(self) -> None:
        self.closed = True


def live_frame(seq: int, captured_at: float = 0.0) -> Frame:
    """A frame captured when the wall clock of `FakeClocks` read ``captured_at``."""
    mono = captured_at - FakeClocks.WALL_AHEAD_OF_MONO
    return Frame(f"cam-{seq}", solid(seq), captured_at, seq=seq, captured_mono=mono)


def parts_of(source: TriggeredSource, reads: int = 20) -> list[Frame]:
    return [f for f in (source.read(0.0) for _ in range(reads)) if f is not None]


def test_every_frame_passes_frames_through() -> None:
    inner = FakeLiveSource([live_frame(s) for s in (1, 2, 3)])
    source = TriggeredSource(inner)
    assert [f.seq for f in parts_of(source)] == [1, 2, 3]
    assert (source.reconnects, source.frame_age_s) == (2, 0.25)
    source.close()
    assert inner.closed


def test_every_nth_counts_captured_frames_including_dropped_ones() -> None:
    source = TriggeredSource(
        FakeLiveSource([live_frame(s) for s in range(1, 10)]), mode="every_nth", every_nth=3
    )
    assert [f.seq for f in parts_of(source)] == [1, 4, 7]
    # Frames 3, 4 and 7 were dropped by the reader: the count still follows the camera.
    gappy = TriggeredSource(
        FakeLiveSource([live_frame(s) for s in (1, 2, 5, 6, 8, 9, 10, 11)]),
        mode="every_nth",
        every_nth=3,
    )
    assert [f.seq for f in parts_of(gappy)] == [1, 5, 8, 11]


def test_every_nth_without_capture_counter_counts_frames() -> None:
    frames = [Frame(f"x-{n}", solid(n), 0.0) for n in range(7)]
    source = TriggeredSource(FakeLiveSource(frames), mode="every_nth", every_nth=2)
    assert [f.part_id for f in parts_of(source)] == ["x-0", "x-2", "x-4", "x-6"]


class FakeClocks:
    WALL_AHEAD_OF_MONO = 950.0

    def __init__(self) -> None:
        self.wall = 1000.0
        self.mono = self.wall - self.WALL_AHEAD_OF_MONO

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def external(frames: list[Frame], clocks: FakeClocks, timeout_s: float = 2.0) -> TriggeredSource:
    return TriggeredSource(
        FakeLiveSource(frames),
        mode="external",
        trigger_timeout_s=timeout_s,
        monotonic=lambda: clocks.mono,
    )


def test_external_trigger_takes_the_first_frame_after_the_trigger() -> None:
    clocks = FakeClocks()
    source = external([live_frame(1, 999.0), live_frame(2, 1000.5), live_frame(3, 1001.5)], clocks)
    assert source.read(0.0) is None  # no trigger: no part
    source.trigger("PLC-0042")
    part = source.read(0.0)
    assert part is not None
    assert (part.part_id, part.seq) == ("PLC-0042", 2)  # frame 1 predates the trigger
    clocks.advance(1.0)
    source.trigger(None)
    part = source.read(0.0)
    assert part is not None
    assert (part.part_id, part.seq) == ("cam-3", 3)  # no id from the PLC: the camera's id
    assert source.read(0.0) is None


def test_each_trigger_gets_its_own_frame() -> None:
    clocks = FakeClocks()
    source = external([live_frame(s, 1000.0 + s) for s in (1, 2, 3)], clocks)
    source.trigger("A")
    source.trigger("B")
    assert [f.part_id for f in parts_of(source)] == ["A", "B"]


def test_trigger_without_a_frame_in_time_is_missed() -> None:
    clocks = FakeClocks()
    source = external([], clocks, timeout_s=2.0)
    source.trigger("A")
    assert source.read(0.0) is None
    assert source.pending_triggers == 1
    clocks.advance(2.5)
    assert source.read(0.0) is None
    assert (source.pending_triggers, source.missed_triggers) == (0, 1)


def test_triggers_are_ignored_outside_external_mode() -> None:
    source = TriggeredSource(FakeLiveSource([]), mode="every_frame")
    source.trigger("A")
    assert (source.ignored_triggers, source.pending_triggers) == (1, 0)


def test_external_read_waits_for_a_trigger_from_another_thread() -> None:
    later = Frame("cam-1", solid(1), time.time() + 60, seq=1, captured_mono=time.monotonic() + 60)
    inner = FakeLiveSource([later])
    source = TriggeredSource(inner, mode="external")
    threading.Timer(0.05, source.trigger, args=("late",)).start()
    part = source.read(WAIT_S)
    assert part is not None and part.part_id == "late"


# --- live reader with a fake capture ---------------------------------------------------------

_FAIL = object()


class FakeCapture:
    """One connection: returns what the test pushes, blocks like a camera when nothing comes."""

    def __init__(self, camera: FakeCamera) -> None:
        self.camera = camera
        self.queue: queue.Queue[Any] = queue.Queue()
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.camera.online

    def read(self) -> tuple[bool, Any]:
        while not self.camera.shut:
            if not self.camera.online:  # a dropped stream fails every read, as OpenCV's do
                return False, None
            try:
                item = self.queue.get(timeout=0.01)
            except queue.Empty:
                continue
            return (False, None) if item is _FAIL else (True, item)
        return False, None

    def release(self) -> None:
        self.released = True


class FakeCamera:
    def __init__(self) -> None:
        self.online = True
        self.shut = False
        self.captures: list[FakeCapture] = []

    def open(self) -> FakeCapture:
        capture = FakeCapture(self)
        self.captures.append(capture)
        return capture

    def push(self, item: Any) -> None:
        self.captures[-1].queue.put(item)


@pytest.fixture
def camera() -> Iterator[FakeCamera]:
    fake = FakeCamera()
    yield fake
    fake.shut = True


def make_reader(camera: FakeCamera, **kwargs: Any) -> LatestFrameReader:
    settings: dict[str, Any] = {
        "stale_after_s": 5.0,
        "reconnect_min_s": 0.01,
        "reconnect_max_s": 0.05,
        "first_frame_timeout_s": 5.0,
    }
    settings.update(kwargs)
    return LatestFrameReader(camera.open, name="camera:fake", station="st-1", **settings)


def test_reader_hands_on_the_newest_frame_and_drops_the_rest(camera: FakeCamera) -> None:
    reader = make_reader(camera)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        for value in (1, 2, 3, 4, 5):
            camera.push(solid(value))
        assert wait_until(lambda: reader.frames_captured == 5)
        frame = reader.read(1.0)
        assert frame is not None
        assert int(frame.image[0, 0, 0]) == 5
        assert frame.seq == 5
        assert frame.part_id.startswith("st-1-") and frame.part_id.endswith("-5")
        assert reader.dropped == 4
        assert reader.read(0.05) is None  # never the same frame twice
        camera.push(solid(6, (8, 8)))  # a gray camera
        frame = reader.read(1.0)
        assert frame is not None
        assert frame.image.shape == (8, 8, 3)
        assert reader.dropped == 4
        assert reader.frame_age_s < 1.0
    finally:
        camera.shut = True
        reader.close()


def test_reader_reconnects_with_backoff_after_a_drop(camera: FakeCamera) -> None:
    reader = make_reader(camera)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(solid(1))
        assert reader.read(1.0) is not None
        camera.online = False  # the stream drops, and stays down for a while
        camera.push(_FAIL)
        assert wait_until(lambda: reader.reconnect_attempts >= 3)
        assert reader.read(0.05) is None
        assert reader.reconnects == 0  # tried, not yet back
        assert not reader.connected
        assert all(c.released for c in camera.captures[:-1])  # the last may be opening
        camera.online = True
        assert wait_until(lambda: camera.captures[-1].isOpened() and reader._connection is not None)

        def next_frame_arrives() -> bool:
            camera.push(solid(9))
            return reader.read(0.05) is not None

        assert wait_until(next_frame_arrives)
        assert reader.reconnects == 1
        assert reader.connected
    finally:
        camera.shut = True
        reader.close()


def test_reader_reopens_a_stale_stream(camera: FakeCamera) -> None:
    reader = make_reader(camera, stale_after_s=0.1)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(solid(1))
        assert reader.read(1.0) is not None
        # No failure, just silence: the reader gives up on this connection and opens another.
        assert wait_until(lambda: len(camera.captures) >= 2)
        camera.push(solid(2))
        frame = reader.read(1.0)
        assert frame is not None and int(frame.image[0, 0, 0]) == 2
        assert reader.reconnects >= 1
    finally:
        camera.shut = True
        reader.close()


def test_the_first_frame_wait_starts_once_the_stream_is_open(camera: FakeCamera) -> None:
    """Opening a network stream takes its own time (FFmpeg: up to 5 s); the first frame then
    gets the full first-frame timeout instead of what the opening left of it."""

    def slow_open() -> FakeCapture:
        time.sleep(0.4)
        return camera.open()

    reader = LatestFrameReader(
        slow_open, name="camera:slow", station="st-1", stale_after_s=5.0,
        reconnect_min_s=0.01, reconnect_max_s=0.05, first_frame_timeout_s=0.5,
    )
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        time.sleep(0.3)  # 0.3 s after opening, 0.7 s after the open began
        camera.push(solid(1))
        assert reader.read(1.0) is not None
        assert len(camera.captures) == 1, "the connection was given up while the frame came"
        assert reader.reconnect_attempts == 0
    finally:
        camera.shut = True
        reader.close()


def test_a_stream_that_never_opens_is_retried(camera: FakeCamera) -> None:
    opened = threading.Event()

    def hung_open() -> FakeCapture:
        if not opened.is_set():
            opened.set()
            while not camera.shut:  # inside OpenCV: cannot be interrupted
                time.sleep(0.01)
        return camera.open()

    reader = LatestFrameReader(
        hung_open, name="camera:hung", station="st-1", stale_after_s=5.0,
        reconnect_min_s=0.01, reconnect_max_s=0.05, first_frame_timeout_s=5.0,
        open_timeout_s=0.2,
    )
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        assert reader.abandoned == 1
        camera.push(solid(1))
        assert reader.read(1.0) is not None
    finally:
        camera.shut = True
        reader.close()


def test_a_driver_that_hangs_every_open_does_not_pile_up_threads(camera: FakeCamera) -> None:
    """Every open hangs inside the driver: after MAX_HUNG_CONNECTIONS abandoned ones the reader
    waits for one of them to return before it opens another."""
    released = threading.Semaphore(0)
    opens: list[int] = []

    def wedged_open() -> FakeCapture:
        opens.append(1)
        while not camera.shut and not released.acquire(timeout=0.01):
            pass  # inside OpenCV: cannot be interrupted
        return camera.open()

    reader = LatestFrameReader(
        wedged_open, name="camera:wedged", station="st-1", stale_after_s=5.0,
        reconnect_min_s=0.01, reconnect_max_s=0.02, first_frame_timeout_s=5.0,
        open_timeout_s=0.05,
    )
    try:
        assert wait_until(lambda: reader.abandoned == MAX_HUNG_CONNECTIONS)
        time.sleep(0.5)  # dozens of attempts' worth of backoff
        assert len(opens) == MAX_HUNG_CONNECTIONS  # no fourth while all three hang
        released.release()  # one hung open returns
        assert wait_until(lambda: len(opens) > MAX_HUNG_CONNECTIONS, timeout=5.0)
    finally:
        camera.shut = True
        reader.close()


def test_a_busy_station_still_gets_the_first_frame_after_each_trigger(
    camera: FakeCamera,
) -> None:
    """The PLC triggers while the station is still judging the previous part: the part is the
    frame captured just after the trigger, not the newest one when the station gets to it (by
    then the part may have left the field of view)."""
    source = parse_source(
        "camera:0", station="st-1", options=SourceOptions(trigger="external"),
        capture_factory=camera.open,
    )
    assert isinstance(source, TriggeredSource)
    reader = source.inner
    assert isinstance(reader, LatestFrameReader)

    def capture(*values: int) -> None:
        expected = reader.frames_captured + len(values)
        for value in values:
            camera.push(solid(value))
        assert wait_until(lambda: reader.frames_captured == expected)

    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        capture(1, 2, 3)
        source.trigger("A")
        capture(4, 5)
        source.trigger("B")
        capture(6, 7, 8)  # the station is busy all this time
        parts = [source.read(1.0) for _ in range(2)]
        assert [(f.part_id, f.seq) for f in parts if f] == [("A", 4), ("B", 6)]
        assert source.read(0.05) is None  # no trigger, no part
        source.trigger("C")
        capture(9)
        part = source.read(1.0)
        assert part is not None and (part.part_id, part.seq) == ("C", 9)
        assert reader.dropped == 6  # 1, 2, 3, 5, 7 and 8: frames of no part
    finally:
        camera.shut = True
        source.close()


def test_close_stops_the_reader_promptly(camera: FakeCamera) -> None:
    reader = make_reader(camera)
    assert wait_until(lambda: len(camera.captures) == 1)
    started = time.monotonic()
    reader.close()
    assert time.monotonic() - started < 3.0
    assert reader.read(0.0) is None


def test_parse_source_wraps_live_sources_in_the_trigger(camera: FakeCamera) -> None:
    source = parse_source(
        "camera:0",
        station="st-1",
        options=SourceOptions(trigger="every_nth", every_nth=2),
        capture_factory=camera.open,
    )
    try:
        assert isinstance(source, TriggeredSource)
        assert isinstance(source, FrameSource)
        assert wait_until(lambda: len(camera.captures) == 1)
        seen = []
        for value in range(1, 5):
            camera.push(solid(value))
            frame = source.read(1.0) if value % 2 else source.read(0.2)
            if frame is not None:
                seen.append(frame.seq)
        assert seen == [1, 3]
    finally:
        camera.shut = True
        source.close()


@pytest.mark.parametrize(
    ("payload", "part_id", "problem"),
    [
        (b'{"part_id": "PLC-0007"}', "PLC-0007", None),
        (b"", None, None),
        (b"  \n", None, None),
        (b"{}", None, None),
        (b'{"part_id": ""}', None, None),
        (b'{"part_id": null}', None, None),
        (b"PART 8", None, "not JSON"),
        (b"\xff\xfe", None, "not JSON"),
        (b'{"part_id": "P", "n": ' + b"9" * 5000 + b"}", None, "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not JSON"),
        (b'["PLC-1"]', None, "not a JSON object"),
        (b'{"part_id": 17}', None, "not a string: 17"),
        (('{"part_id": "' + "X" * 129 + '"}').encode(), None, "129 characters, more than 128"),
    ],
)
def test_a_trigger_payload_names_the_part_or_says_what_is_wrong(
    payload: bytes, part_id: str | None, problem: str | None
) -> None:
    found, error = trigger_part_id(payload)
    assert found == part_id
    if problem is None:
        assert error is None
    else:
        assert error is not None and problem in error


def test_a_trigger_part_id_of_the_longest_allowed_length_is_kept_whole() -> None:
    longest = "P" * PART_ID_MAX_LENGTH
    assert trigger_part_id(json.dumps({"part_id": longest}).encode()) == (longest, None)


@pytest.mark.parametrize(
    "bad_id",
    ["PLC-\ud800", "X" * (PART_ID_MAX_LENGTH + 1)],
    ids=["lone-surrogate", "too-long"],
)
def test_a_trigger_id_no_message_can_carry_gives_the_camera_id(
    bad_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    clocks = FakeClocks()
    source = external([live_frame(1, 1000.5), live_frame(2, 1000.6)], clocks)
    with caplog.at_level(logging.WARNING):
        source.trigger(bad_id)
    source.trigger("PLC-2")
    assert [f.part_id for f in parts_of(source)] == ["cam-1", "PLC-2"]
    assert "the part gets the camera's id" in caplog.text
