"""What months of real cameras, video files and image folders do to a station's source: a bad
frame in the middle of a recording, a sample folder with a broken file read over and over, class
sub-folders, huge images, options that do nothing for the source they are set on."""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.sources import (
    EndOfSource,
    Frame,
    FrameSource,
    LatestFrameReader,
    SourceError,
    SourceOptions,
    parse_source,
    parse_spec,
)
from tests.unit.test_sources import solid, wait_until

pytestmark = pytest.mark.unit


def read_until_end(source: FrameSource, limit: int = 100) -> list[Frame]:
    frames: list[Frame] = []
    with pytest.raises(EndOfSource):
        for _ in range(limit):
            frame = source.read(1.0)
            assert frame is not None
            frames.append(frame)
    return frames


def level(frame: Frame | None) -> int:
    assert frame is not None
    return round(float(frame.image.mean()) / 8)


# --- video file with a damaged frame -----------------------------------------------------------


@pytest.fixture
def damaged_video(tmp_path: Path) -> Path:
    """30 frames of MJPG, frame 10 overwritten with zeros (a bad sector, a glitch in a copy)."""
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for index in range(30):
        writer.write(solid(index * 8, (48, 64, 3)))
    writer.release()
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xd8"]
    assert len(starts) == 30
    data[starts[10] + 2 : starts[10] + 400] = bytes(398)
    path.write_bytes(bytes(data))
    return path


def test_a_bad_frame_mid_video_is_skipped_not_taken_for_the_end(
    damaged_video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = parse_source(f"video:{damaged_video}", station="st-1")
    with caplog.at_level(logging.WARNING):
        frames = read_until_end(source)
    levels = [level(f) for f in frames]
    # OpenCV's read after the bad frame may lose one more; the rest of the file comes.
    assert levels[:10] == list(range(10))
    assert levels[10:] in (list(range(11, 30)), list(range(12, 30)))
    assert source.skipped == 1  # type: ignore[attr-defined]
    assert "frame 11" in caplog.text


def test_a_looping_video_with_a_bad_frame_still_reaches_its_end(damaged_video: Path) -> None:
    source = parse_source(
        f"video:{damaged_video}", station="st-1", options=SourceOptions(loop=True)
    )
    levels = [level(source.read(1.0)) for _ in range(32)]
    end = levels.index(29)  # a bad frame took the loop back to the start before the fix
    assert levels[end + 1 : end + 4] == [0, 1, 2]
    source.close()


# --- folders -----------------------------------------------------------------------------------


def test_a_broken_file_in_a_looping_folder_is_reported_once_not_every_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sample folder read in a loop for months: one warning per broken file, not one a pass."""
    cv2.imwrite(str(tmp_path / "a.png"), solid(10))
    cv2.imwrite(str(tmp_path / "c.png"), solid(30))
    (tmp_path / "b.png").write_bytes(b"not a png")
    source = parse_source(f"folder:{tmp_path}", station="st-1", options=SourceOptions(loop=True))
    with caplog.at_level(logging.WARNING):
        frames = [source.read(1.0) for _ in range(6)]  # three passes
    assert [int(f.image[0, 0, 0]) for f in frames if f] == [10, 30] * 3
    assert source.skipped == 3  # type: ignore[attr-defined]
    assert caplog.text.count("b.png") == 1
    # The same name with new content (copied again) is news.
    (tmp_path / "b.png").write_bytes(b"still not a png, but another file")
    with caplog.at_level(logging.WARNING):
        source.read(1.0)
        source.read(1.0)
    assert caplog.text.count("b.png") == 2


def test_hidden_files_are_not_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder filled from a Mac's USB stick holds ``._name.jpg`` companions; rsync and many
    copy tools write ``.name.jpg.tmp``-like hidden files while copying."""
    ok, encoded = cv2.imencode(".png", solid(10))
    assert ok
    (tmp_path / "a.png").write_bytes(encoded.tobytes())
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    source = parse_source(f"folder:{tmp_path}", station="st-1")
    with caplog.at_level(logging.WARNING):
        frames = read_until_end(source)
    assert len(frames) == 1
    assert source.skipped == 0  # type: ignore[attr-defined]
    assert "._a.png" not in caplog.text


def test_a_folder_of_class_sub_folders_says_they_are_not_read(tmp_path: Path) -> None:
    for name in ("ok", "crack"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "part.png"), solid(10))
    with pytest.raises(SourceError, match=r"sub-folders are not read \(crack, ok\)"):
        parse_source(f"folder:{tmp_path}", station="st-1")


def png_header_only(width: int, height: int) -> bytes:
    """The start of a PNG of the given size: signature and IHDR chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_image_size_is_read_from_the_header(suffix: str) -> None:
    ok, encoded = cv2.imencode(suffix, np.zeros((37, 91, 3), np.uint8))
    assert ok
    assert sources.image_size(encoded.tobytes()) == (91, 37)


def test_image_size_of_what_is_not_an_image_is_unknown() -> None:
    assert sources.image_size(b"") is None
    assert sources.image_size(b"hello, world") is None
    assert sources.image_size(b"\xff\xd8\xff\xe0 cut short") is None
    assert sources.image_size(png_header_only(20_000, 30_000)) == (20_000, 30_000)
    os2_bmp = b"BM" + bytes(12) + struct.pack("<IHH", 12, 640, 480) + bytes(8)
    assert sources.image_size(os2_bmp) == (640, 480)


def test_an_image_too_large_to_hold_in_memory_is_skipped_before_decoding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A panorama or a scan dropped into a sample folder (or a PNG whose header claims
    30,000 x 30,000 pixels) would take gigabytes to decode: a station on a small device is
    killed for memory, restarts, and meets the same file again."""
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 64 * 64, raising=False)
    cv2.imwrite(str(tmp_path / "a.png"), solid(10, (64, 64, 3)))
    cv2.imwrite(str(tmp_path / "b.png"), solid(20, (64, 65, 3)))
    cv2.imwrite(str(tmp_path / "c.jpg"), solid(30, (65, 64, 3)))
    source = parse_source(f"folder:{tmp_path}", station="st-1")
    decoded: list[Any] = []
    real_imdecode = cv2.imdecode

    def counting_imdecode(*args: Any) -> Any:
        decoded.append(args)
        return real_imdecode(*args)

    monkeypatch.setattr(cv2, "imdecode", counting_imdecode)
    with caplog.at_level(logging.WARNING):
        frames = read_until_end(source)
    assert [int(f.image[0, 0, 0]) for f in frames] == [10]
    assert len(decoded) == 1
    assert "b.png: 65 x 64 pixels, more than" in caplog.text
    assert "c.jpg: 64 x 65 pixels, more than" in caplog.text


# --- options that do nothing for the source they are set on ------------------------------------


@pytest.mark.parametrize(
    ("spec", "options", "option"),
    [
        ("camera:0", {"rate_hz": 5}, "rate_hz"),
        ("camera:0", {"loop": True}, "loop"),
        ("rtsp://cam.local/s1", {"width": 1280, "height": 720}, "height, width"),
        ("http://cam.local/v.mjpg", {"fps": 10}, "fps"),
        ("folder:x", {"stale_after_s": 1.0}, "stale_after_s"),
        ("video:x.avi", {"seed": 3}, "seed"),
        ("synthetic:", {"loop": True}, "loop"),
        ("synthetic:rate=5", {"reconnect_max_s": 20.0}, "reconnect_max_s"),
    ],
)
def test_an_option_that_does_nothing_for_the_source_is_an_error_naming_it(
    spec: str, options: dict[str, Any], option: str
) -> None:
    """``rate_hz: 2`` on a camera did nothing: the station judged every frame at 25 a second."""
    with pytest.raises(ValueError, match=f"{option} (does|do) not apply to"):
        parse_spec(spec, SourceOptions.model_validate(options))


def test_the_option_error_of_a_stream_does_not_show_its_password() -> None:
    with pytest.raises(ValueError, match="width does not apply") as error:
        parse_spec("rtsp://admin:s3cret@cam.local/s1", SourceOptions(width=1280))
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("camera:0", {"width": 640, "height": 480, "fps": 30, "stale_after_s": 1.0}),
        ("rtsp://cam.local/s1", {"trigger": "every_nth", "every_nth": 5}),
        ("folder:x", {"loop": True, "rate_hz": 5}),
        ("video:x.avi", {"loop": True}),
        ("synthetic:", {"seed": 3, "size": 64, "defect_rate": 0.1, "rate_hz": 5}),
        # An option written out at its default changes nothing: templates may carry them.
        ("camera:0", {"loop": False}),
        ("folder:x", {"trigger": "every_frame", "every_nth": 1}),
    ],
)
def test_the_options_of_each_source_kind_are_accepted(
    spec: str, options: dict[str, Any]
) -> None:
    parse_spec(spec, SourceOptions.model_validate(options))


# --- live stream with an undecodable frame -----------------------------------------------------


class ScriptedCamera:
    """Each capture it opens returns the next results of ``script`` (a frame, or ``None`` for a
    failed read); then it fails every read, as a closed stream does, or with ``silent`` waits
    for frames that do not come."""

    def __init__(self, script: list[Any], *, silent: bool = False) -> None:
        self.script = list(script)
        self.silent = silent
        self.opened = 0
        self.unplugged = threading.Event()

    def open(self) -> Any:
        self.opened += 1
        camera = self

        class Capture:
            def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
                return True

            def read(self) -> tuple[bool, Any]:
                if not camera.script and camera.silent:
                    camera.unplugged.wait()
                item = camera.script.pop(0) if camera.script else None
                return item is not None, item

            def release(self) -> None:
                pass

        return Capture()


def test_one_undecodable_frame_does_not_drop_the_stream() -> None:
    """OpenCV returns a failed read for one corrupt JPEG in an MJPEG stream and reads the next
    frame fine; reconnecting for it lost the frames of a reconnect and counted a drop."""
    camera = ScriptedCamera([solid(1), None, solid(2), None, None, solid(3)], silent=True)
    reader = LatestFrameReader(
        camera.open, name="camera:fake", station="st-1", stale_after_s=5.0,
        reconnect_min_s=5.0, reconnect_max_s=5.0, first_frame_timeout_s=5.0,
    )
    try:
        assert wait_until(lambda: reader.frames_captured == 3)
        assert camera.opened == 1
        assert reader.failed_reads == 3
        assert reader.reconnect_attempts == 0
    finally:
        camera.unplugged.set()
        reader.close()


def test_a_stream_whose_reads_keep_failing_is_reopened() -> None:
    camera = ScriptedCamera([solid(1)])
    reader = LatestFrameReader(
        camera.open, name="camera:fake", station="st-1", stale_after_s=5.0,
        reconnect_min_s=0.01, reconnect_max_s=0.01, first_frame_timeout_s=5.0,
    )
    try:
        assert wait_until(lambda: camera.opened >= 2)
        assert reader.frames_captured == 1
        assert reader.failed_reads >= sources.MAX_FAILED_READS
    finally:
        reader.close()
