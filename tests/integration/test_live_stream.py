"""A station on a live network camera: the test serves an HTTP MJPEG stream of synthetic parts,
a real agent judges them and publishes through a real Mosquitto to a receipting controller
stand-in. The camera goes away: the agent keeps running and keeps trying. The camera comes back
on the same address: decisions flow again with nobody touching the station."""

from __future__ import annotations

import json
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

STATION = "cam-01"

pytestmark = pytest.mark.skipif(
    "FFMPEG:                      YES" not in cv2.getBuildInformation(),
    reason="this OpenCV build has no FFmpeg backend for network streams",
)


def part_camera(port: int = 0) -> MjpegCamera:
    """An IP camera showing synthetic parts, one per frame."""
    generator = PartGenerator(seed=5)
    jpegs = [cv2.imencode(".jpg", generator.part(i).image)[1].tobytes() for i in range(16)]
    return MjpegCamera(lambda n: jpegs[n % len(jpegs)], port)


@pytest.fixture
def cameras() -> Iterator[list[MjpegCamera]]:
    running = [part_camera()]  # a list: the test replaces the camera when it comes back
    yield running
    running[-1].stop()


def test_agent_rides_out_a_camera_outage(
    tmp_path: Path, broker: Broker, cameras: list[MjpegCamera]
) -> None:
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source=cameras[0].url,
        source_options={
            "trigger": "every_nth", "every_nth": 5,
            "stale_after_s": 1.0, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5,
        },
        automation="full",
    )
    agent = Agent(config)
    assert isinstance(agent.source, TriggeredSource)
    reader = agent.source.inner
    assert isinstance(reader, LatestFrameReader)
    finished = threading.Event()
    exit_status: list[int] = []

    def run() -> None:
        exit_status.append(agent.run())
        finished.set()

    threading.Thread(target=run, name="agent-under-test", daemon=True).start()
    try:
        def decisions() -> list[p.Decision]:
            return collector.unique(p.Decision, STATION)

        # Frames flow: one part every 5th frame, judged by the model, receipted by "controller".
        wait_for(lambda: len(decisions()) >= 4, 20, "decisions from the live stream")
        first = decisions()
        assert all(d.decided_by == p.DecidedBy.ACTIVE and d.label for d in first)
        assert len({d.part_id for d in first}) == len(first)

        # The camera goes away. The agent keeps running, its reader keeps trying to reconnect.
        cameras[0].stop()
        attempts = reader.reconnect_attempts
        wait_for(lambda: reader.reconnect_attempts >= attempts + 2 and not reader.connected, 15,
                 "reconnect attempts while the camera is down")
        during_outage = len(decisions())
        assert not finished.is_set(), "the agent stopped when its camera went away"
        states_before = len(collector.of(p.StationState, STATION))
        wait_for(lambda: len(collector.of(p.StationState, STATION)) > states_before, 10,
                 "the station still reporting its state while the camera is down")
        assert collector.of(p.StationState, STATION)[-1].online
        wait_for(lambda: any(f.code == "source" for f in
                             collector.of(p.StationState, STATION)[-1].faults), 10,
                 "the outage reported as a source fault")
        assert len(decisions()) <= during_outage + 1  # at most a part already in hand

        # The camera is back on the same address: decisions flow again, nobody touched anything.
        cameras.append(part_camera(cameras[0].port))
        wait_for(lambda: len(decisions()) >= during_outage + 4, 20,
                 "decisions after the camera came back")
        assert reader.reconnects >= 1
        wait_for(lambda: not any(f.code == "source" for f in
                                 collector.of(p.StationState, STATION)[-1].faults), 10,
                 "the source fault cleared")
        wait_for(
            lambda: (agent.metrics.registry.get_sample_value(
                "linesight_source_reconnects", {"station": STATION}) or 0) >= 1,
            10, "the reconnect in the station's Prometheus metrics",
        )
        assert not finished.is_set()
        # Everything the station decided reached the controller stand-in and was receipted.
        wait_for(lambda: agent.store.outbox_depth() == 0, 10, "every decision receipted")
        assert {d.part_id for d in decisions()} <= {
            m.part_id for m in receipter.deliveries if isinstance(m, p.Decision)
        }
        assert collector.errors == []
    finally:
        agent.stop()
        finished.wait(20)
        receipter.close()
        collector.close()
    assert exit_status == [0]


def test_plc_triggers_over_mqtt_name_the_parts(
    tmp_path: Path, broker: Broker, cameras: list[MjpegCamera]
) -> None:
    """External trigger mode: a part per trigger message, under the PLC's id when it is usable,
    under the camera's id when the payload is not (never cut short, never refused)."""
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source=cameras[0].url,
        source_options={"trigger": "external", "stale_after_s": 5.0},
        automation="full",
    )
    agent = Agent(config)
    assert isinstance(agent.source, TriggeredSource)
    reader = agent.source.inner
    assert isinstance(reader, LatestFrameReader)
    plc = MqttLink(LinkConfig(url=broker.url, client_id="plc-gateway"))
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
        time.sleep(1.0)  # frames flow, but no trigger yet: no part
        assert decisions() == []

        plc.publish(topic, b'{"part_id": "PLC-0007"}', qos=1).wait(5)
        wait_for(lambda: len(decisions()) == 1, 15, "the part of the first trigger")
        assert decisions()[0].part_id == "PLC-0007"

        too_long = "X" * (p.PART_ID_MAX_LENGTH + 1)
        for payload in (json.dumps({"part_id": too_long}).encode(), b"PART 8", b""):
            plc.publish(topic, payload, qos=1).wait(5)
        wait_for(lambda: len(decisions()) == 4, 15, "a part for each of the other triggers")
        others = [d.part_id for d in decisions()[1:]]
        assert all(part_id.startswith(f"{STATION}-") for part_id in others), others
        assert len(set(others)) == 3
        time.sleep(1.0)
        assert len(decisions()) == 4, "a part without a trigger"
        assert all(d.decided_by == p.DecidedBy.ACTIVE and d.label for d in decisions())
    finally:
        agent.stop()
        thread.join(30)
        plc.stop()
        receipter.close()
        collector.close()
    assert not thread.is_alive()
