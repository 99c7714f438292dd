"""A PLC gateway's trigger with a part id no message can carry: the part is judged under the
camera's id and nothing else the station stores is lost with it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from edge_agent.agent import Agent
from edge_agent.sources import LatestFrameReader, TriggeredSource
from edge_agent.synthetic import PartGenerator
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import Collector, MjpegCamera, Receipter, station_config, wait_for

STATION = "cam-02"

pytestmark = pytest.mark.skipif(
    "FFMPEG:                      YES" not in cv2.getBuildInformation(),
    reason="this OpenCV build has no FFmpeg backend for network streams",
)


@pytest.fixture
def camera() -> Iterator[MjpegCamera]:
    generator = PartGenerator(seed=6)
    jpegs = [cv2.imencode(".jpg", generator.part(i).image)[1].tobytes() for i in range(8)]
    running = MjpegCamera(lambda n: jpegs[n % len(jpegs)])
    yield running
    running.stop()


def test_a_trigger_id_that_is_not_valid_unicode_costs_no_part(
    tmp_path: Path, broker: Broker, camera: MjpegCamera
) -> None:
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source=camera.url,
        source_options={"trigger": "external", "stale_after_s": 5.0},
        automation="full",
    )
    agent = Agent(config)
    assert isinstance(agent.source, TriggeredSource)
    reader = agent.source.inner
    assert isinstance(reader, LatestFrameReader)
    plc = MqttLink(LinkConfig(url=broker.url, client_id="plc-gateway-2"))
    plc.start()
    assert plc.wait_connected(10)
    thread = threading.Thread(target=agent.run, name="agent-under-test", daemon=True)
    thread.start()
    topic = p.Topics().trigger(STATION)
    try:
        def decisions() -> list[p.Decision]:
            return collector.unique(p.Decision, STATION)

        wait_for(lambda: reader.connected and agent.link.connected, 20,
                 "the camera stream and the broker connected")
        # Valid JSON, but "\ud800" is half of a UTF-16 pair: no UTF-8 text, no message field.
        plc.publish(topic, b'{"part_id": "PLC-\\ud800"}', qos=1).wait(5)
        plc.publish(topic, b'{"part_id": "PLC-0009"}', qos=1).wait(5)
        wait_for(lambda: len(decisions()) == 2, 15, "a part for each trigger")
        ids = [d.part_id for d in decisions()]
        assert ids[0].startswith(f"{STATION}-") and ids[1] == "PLC-0009", ids
        time.sleep(0.5)
        assert not any(f.code == "outbox_write" for f in agent.faults.values())
    finally:
        agent.stop()
        thread.join(30)
        plc.stop()
        receipter.close()
        collector.close()
    assert not thread.is_alive()
