"""Files an integrator points a station at, written with real OpenCV: images whose name does not
say their format, a video with no frame in it, a video path that names a folder, a bitmap far
too large to hold in memory."""

from __future__ import annotations

import logging
import struct
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import sources
from edge_agent.sources import SourceError, SourceOptions, parse_source
from tests.unit.test_sources import solid
from tests.unit.test_sources_robustness import read_until_end

pytestmark = pytest.mark.unit


def encoded(suffix: str, value: int, shape: tuple[int, ...] = (16, 16, 3)) -> bytes:
    ok, data = cv2.imencode(suffix, solid(value, shape))
    assert ok
    return data.tobytes()


def test_an_image_whose_name_says_another_format_is_read(tmp_path: Path) -> None:
    """Export tools and cameras' FTP uploads name files carelessly; OpenCV reads an image by its
    content. Before, a PNG named .jpg was skipped as "JPEG data ends early"."""
    (tmp_path / "a.jpg").write_bytes(encoded(".png", 40))
    (tmp_path / "b.jpeg").write_bytes(encoded(".bmp", 80))
    (tmp_path / "c.png").write_bytes(encoded(".jpg", 120))
    source = parse_source(f"folder:{tmp_path}", station="st-1")
    frames = read_until_end(source)
    assert [round(float(f.image.mean())) for f in frames] == [40, 80, 120]
    assert source.skipped == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("loop", [False, True])
def test_a_video_without_a_frame_is_refused_when_the_station_starts(
    tmp_path: Path, loop: bool
) -> None:
    """Before, a video with no frame opened fine: without loop the station ended at once,
    "after 0 parts", and with loop it raised the same fault every second for ever."""
    path = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    writer.release()
    assert path.stat().st_size > 0  # a container, but nothing in it
    with pytest.raises(SourceError, match=f"video:{path}: no frame"):
        parse_source(f"video:{path}", station="st-1", options=SourceOptions(loop=loop))


def test_a_video_still_hands_on_its_first_frame_first(tmp_path: Path) -> None:
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    for index in range(3):
        writer.write(solid(40 + index * 40, (48, 64, 3)))
    writer.release()
    frames = read_until_end(parse_source(f"video:{path}", station="st-1"))
    assert [round(float(f.image.mean()) / 40) for f in frames] == [1, 2, 3]


def test_a_video_path_that_names_a_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"is a directory.*folder:"):
        parse_source(f"video:{tmp_path}", station="st-1")


def test_a_bitmap_too_large_is_refused_without_reading_it_into_memory(tmp_path: Path) -> None:
    """A BMP holds its pixels uncompressed: one whose header gives 30,000 x 20,000 pixels is a
    1.8 GB file. Before, the whole file was read into memory before its header was checked."""
    width, height = 30_000, 20_000
    header = (
        b"BM" + struct.pack("<IHHI", 0, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    )
    path = tmp_path / "panorama.bmp"
    with path.open("wb") as file:
        file.write(header)
        file.truncate(len(header) + width * height * 3)  # sparse: no disk space taken
    tracemalloc.start()
    try:
        image, problem = sources.read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image is None
    assert "30000 x 20000 pixels, more than" in problem
    assert peak < 64 * sources.MIB


def test_deep_gray_and_transparent_images_become_bgr_parts(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a-16bit.png"), np.full((12, 10), 200 << 8, np.uint16))
    cv2.imwrite(str(tmp_path / "b-gray.png"), solid(90, (12, 10)))
    cv2.imwrite(str(tmp_path / "c-rgba.png"), solid(70, (12, 10, 4)))
    cv2.imwrite(str(tmp_path / "d-gray.jpg"), solid(50, (12, 10)))
    frames = read_until_end(parse_source(f"folder:{tmp_path}", station="st-1"))
    assert all(f.image.shape == (12, 10, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [round(float(f.image.mean())) for f in frames] == [200, 90, 70, 50]


def test_an_image_renamed_or_removed_during_a_pass_is_skipped_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        cv2.imwrite(str(tmp_path / name), solid(value))
    source = parse_source(f"folder:{tmp_path}", station="st-1", options=SourceOptions(loop=True))
    assert round(float(source.read(1.0).image.mean())) == 10  # type: ignore[union-attr]
    (tmp_path / "b.png").rename(tmp_path / "z.png")  # listed for this pass, gone now
    with caplog.at_level(logging.WARNING):
        levels = [round(float(source.read(1.0).image.mean())) for _ in range(4)]  # type: ignore[union-attr]
    assert levels == [30, 10, 30, 20]  # the next pass lists the folder again: z.png is read
    assert "skipping b.png: cannot read" in caplog.text
    assert source.skipped == 1  # type: ignore[attr-defined]
