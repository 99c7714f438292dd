"""Parts a station did not inspect show where maintenance looks: a real agent whose source loses
parts (unreadable images in its folder; PLC triggers while its camera is down) reports them on
its Prometheus port, scraped over HTTP, and in its StationMetrics through a real Mosquitto."""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.sources import FolderSource, SourceOptions, TriggeredSource, parse_source
from edge_agent.synthetic import PartGenerator
from linesight import protocol as p
from linesight.broker import Broker, free_port
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import Collector, station_config, wait_for

STATION = "press-07"


@pytest.fixture
def collector(broker: Broker) -> Iterator[Collector]:
    running = Collector(broker.url)
    yield running
    running.close()


@contextlib.contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    """The agent inspecting in a thread; stopped (and its stop waited for) at the end."""
    finished = threading.Event()

    def run() -> None:
        agent.run()
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        yield agent
    finally:
        agent.stop()
        assert finished.wait(30), "the agent did not stop"


def scrape(port: int) -> dict[str, float]:
    """The station's samples by name, as Prometheus reads them from its metrics port; none
    before the agent serves it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return {}
        raise
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("station") == STATION
    }


def test_unreadable_images_are_counted_as_parts_missed(
    tmp_path: Path, broker: Broker, collector: Collector
) -> None:
    """A folder with two images that do not decode among three good ones: every pass misses
    two parts, and Prometheus and the StationMetrics say so (not only the log)."""
    folder = tmp_path / "parts"
    folder.mkdir()
    generator = PartGenerator(seed=3)
    for index in range(3):
        cv2.imwrite(str(folder / f"good-{index}.png"), generator.part(index).image)
    (folder / "cut-short.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    (folder / "empty.png").write_bytes(b"")
    port = free_port()
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source=f"folder:{folder}",
        source_options={"loop": True, "rate_hz": 50}, metrics_port=port,
        metrics_interval_s=0.3, automation="full", outbox__receipt_wait_s=0.2,
    )
    with running(Agent(config)) as agent:
        source = agent.source
        assert isinstance(source, FolderSource)
        # Skipped is brought up to date after parts missed: once it shows, both do.
        wait_for(lambda: scrape(port).get("linesight_source_skipped_total", 0) >= 2, 10,
                 "the skipped images on the metrics port")
        samples = scrape(port)
        # Each count once: never more than the source itself has counted by now.
        assert 2 <= samples["linesight_parts_missed_total"] <= source.skipped
        assert 2 <= samples["linesight_source_skipped_total"] <= source.skipped
        assert samples["linesight_source_missed_triggers_total"] == 0
        wait_for(lambda: sum(m.parts_missed or 0 for m in collector.of(p.StationMetrics)) >= 2,
                 10, "parts missed in the StationMetrics")
        reported = [m.parts_missed for m in collector.of(p.StationMetrics)]
        assert None not in reported, "a folder source counts what it misses: 0 is a figure"
        assert sum(m or 0 for m in reported) <= source.skipped
        # The two bad files come first in name order: a report may count them before any part.
        wait_for(lambda: sum(m.parts for m in collector.of(p.StationMetrics)) > 0, 10,
                 "inspected parts in the StationMetrics")


class ClosedCamera:
    """A camera that never opens (unplugged, powered off)."""

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return False

    def read(self) -> tuple[bool, None]:
        return False, None

    def release(self) -> None:
        pass


class BrokenCamera(ClosedCamera):
    """A camera that opens but whose every frame fails to decode."""

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True


@pytest.mark.parametrize("camera", [ClosedCamera, BrokenCamera])
def test_plc_triggers_the_camera_could_not_serve_are_counted_as_parts_missed(
    tmp_path: Path, broker: Broker, collector: Collector, camera: type[ClosedCamera]
) -> None:
    """Three parts pass the PLC while the camera is down (or sends only broken frames): each
    trigger expires after stale_after_s, and the metrics port counts three parts missed."""
    options = SourceOptions(trigger="external", stale_after_s=0.2, reconnect_min_s=0.05,
                            reconnect_max_s=0.1)
    source = parse_source("camera:0", station=STATION, options=options,
                          capture_factory=camera)
    assert isinstance(source, TriggeredSource)
    port = free_port()
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source="camera:0",
        source_options=options.model_dump(exclude_unset=True), metrics_port=port,
        metrics_interval_s=0.3, automation="full", outbox__receipt_wait_s=0.2,
    )
    plc = MqttLink(LinkConfig(url=broker.url, client_id="plc-gateway"))
    plc.start()
    try:
        assert plc.wait_connected(10)
        with running(Agent(config, source=source)) as agent:
            wait_for(lambda: agent.link.connected, 10, "the station on the broker")
            wait_for(lambda: bool(collector.of(p.StationState, STATION)), 10, "its state")
            for number in range(3):
                plc.publish(p.Topics().trigger(STATION), f'{{"part_id": "P{number}"}}'.encode(),
                            qos=1).wait(5)
            def missed() -> tuple[float, float]:
                samples = scrape(port)
                return (samples.get("linesight_source_missed_triggers_total", 0),
                        samples.get("linesight_parts_missed_total", 0))

            wait_for(lambda: missed() == (3, 3), 10, "3 missed triggers on the metrics port")
            assert scrape(port)["linesight_source_skipped_total"] == 0
            if camera is BrokenCamera:
                wait_for(lambda: scrape(port).get("linesight_source_failed_reads_total", 0) > 0,
                         10, "the camera's broken frames on the metrics port")
            wait_for(lambda: sum(m.parts_missed or 0
                                 for m in collector.of(p.StationMetrics, STATION)) == 3,
                     10, "the missed parts in the StationMetrics")
            assert agent.parts_inspected == 0
    finally:
        plc.stop()

