"""What a frame source counts of the parts and frames it lost, read through the trigger wrapper
and turned into the station's Prometheus counters once each: real sources on a fake camera."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.metrics import AgentMetrics, SourceLosses, read_source_losses
from edge_agent.sources import FolderSource, SourceOptions, TriggeredSource, parse_source
from edge_agent.synthetic import PartGenerator
from tests.unit.test_sources import _FAIL, FakeCamera, wait_until
from tests.unit.test_sources_memory import big_frame, capture, external_camera

pytestmark = pytest.mark.unit

STATION = "st-1"


@pytest.fixture
def camera() -> Iterator[FakeCamera]:
    fake = FakeCamera()
    yield fake
    fake.shut = True


def sample(metrics: AgentMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"station": STATION})


def test_every_counter_starts_at_zero_so_an_alert_sees_the_first_loss() -> None:
    metrics = AgentMetrics(STATION)
    for name in ("linesight_parts_missed_total", "linesight_source_missed_triggers_total",
                 "linesight_source_ignored_triggers_total", "linesight_source_skipped_total",
                 "linesight_source_frames_let_go_total", "linesight_source_failed_reads_total",
                 "linesight_source_held_bytes"):
        assert sample(metrics, name) == 0, name


def test_a_busy_station_s_let_go_frames_and_missed_triggers_are_read_through_the_trigger(
    camera: FakeCamera,
) -> None:
    """20 triggers with 12-megapixel frames while the station is busy: 13 frames are let go
    (kept in the reader, under the trigger wrapper), their 13 triggers missed (in the wrapper);
    the metrics show both, and the bytes still held."""
    source, reader = external_camera(camera)
    try:
        for number in range(1, 21):
            source.trigger(f"P{number}")
            capture(camera, reader, big_frame(number))
        source.read(0.0)  # the station takes its next part: the let-go triggers are counted
        losses = read_source_losses(source)
        assert losses == SourceLosses(
            missed_triggers=13, ignored_triggers=0, frames_let_go=13, failed_reads=0,
            held_bytes=reader.held_bytes,
        )
        assert losses.parts_missed == 13 and reader.held_bytes > 0
        metrics = AgentMetrics(STATION)
        metrics.record_source(losses)
        assert sample(metrics, "linesight_source_missed_triggers_total") == 13
        assert sample(metrics, "linesight_parts_missed_total") == 13
        assert sample(metrics, "linesight_source_frames_let_go_total") == 13
        assert sample(metrics, "linesight_source_held_bytes") == reader.held_bytes
    finally:
        camera.shut = True  # its reads return at once: the close need not wait for them
        source.close()


def test_a_camera_s_broken_frames_and_ignored_triggers_are_counted(camera: FakeCamera) -> None:
    source = parse_source("camera:0", station=STATION, options=SourceOptions(),
                          capture_factory=camera.open)
    assert isinstance(source, TriggeredSource)
    reader = source.inner
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(np.zeros((8, 8, 3), np.uint8))
        for _ in range(3):
            camera.push(_FAIL)
        assert wait_until(lambda: getattr(reader, "failed_reads", 0) == 3)
        source.trigger("P1")  # every_frame: the part is not this trigger's
        losses = read_source_losses(source)
        assert (losses.failed_reads, losses.ignored_triggers, losses.parts_missed) == (3, 1, 0)
        metrics = AgentMetrics(STATION)
        metrics.record_source(losses)
        assert sample(metrics, "linesight_source_failed_reads_total") == 3
        assert sample(metrics, "linesight_source_ignored_triggers_total") == 1
        assert sample(metrics, "linesight_parts_missed_total") == 0
    finally:
        camera.shut = True  # its reads return at once: the close need not wait for them
        source.close()


def test_each_loss_is_counted_once_however_often_the_source_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "c.png"), PartGenerator(seed=1).part(0).image)
    source = FolderSource(tmp_path, station=STATION, loop=True)
    metrics = AgentMetrics(STATION)
    metrics.record_source(read_source_losses(source))
    assert source.read(0.0) is not None  # skips a.png and b.png
    for _ in range(3):  # once a second, with nothing new in between
        metrics.record_source(read_source_losses(source))
    assert sample(metrics, "linesight_source_skipped_total") == 2
    assert source.read(0.0) is not None  # the next pass skips both again
    metrics.record_source(read_source_losses(source))
    assert sample(metrics, "linesight_source_skipped_total") == 4
    assert sample(metrics, "linesight_parts_missed_total") == 4
    source.close()


def test_a_source_that_counts_nothing_has_no_parts_missed_figure() -> None:
    """The synthetic source (or one a test makes) cannot miss parts: no figure, not 0."""

    class Bare:
        reconnects = 0
        frame_age_s = 0.0

    losses = read_source_losses(Bare())
    assert losses == SourceLosses()
    assert losses.parts_missed is None
    metrics = AgentMetrics(STATION)
    metrics.record_source(losses)
    assert sample(metrics, "linesight_parts_missed_total") == 0


def test_a_source_whose_counter_went_back_is_not_counted_backwards() -> None:
    """A counter never goes down in Prometheus: a smaller reading counts nothing, and what
    comes after it counts from there."""
    metrics = AgentMetrics(STATION)
    metrics.record_source(SourceLosses(skipped=5))
    metrics.record_source(SourceLosses(skipped=2))
    metrics.record_source(SourceLosses(skipped=3))
    assert sample(metrics, "linesight_source_skipped_total") == 6
