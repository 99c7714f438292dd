"""A station (or whoever holds its credentials) flooding the fleet controller with invalid
messages, over a real mosquitto: the other stations' messages are still stored and receipted,
the flood costs one log line, and the ingest thread lives on."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.config import load_controller_config
from deploy.controller import Controller
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import Collector, wait_for
from tests.unit.test_fleet_store import decision, shadow


@pytest.fixture
def controller(tmp_path: Path, broker: Broker) -> Iterator[Controller]:
    running = Controller(load_controller_config(None, {
        "broker.url": broker.url, "data_dir": tmp_path / "fleet", "bundles": tmp_path,
    }))
    running.start()
    yield running
    running.stop()


def link(broker: Broker, client_id: str) -> MqttLink:
    started = MqttLink(LinkConfig(url=broker.url, client_id=client_id))
    started.start()
    assert started.wait_connected(10), f"{client_id} could not connect"
    return started


def flood_payloads(topics: p.Topics) -> list[tuple[str, bytes]]:
    """What the flooding station sends, round and round: garbage, another station's shadow
    result, and messages that parse but hold text no store can keep."""
    ack = json.loads(p.CommandAck(station="bad", seq=0, cmd_id=uuid.uuid4(), command="x",
                                  ok=True).to_json())
    state = json.loads(p.StationState(station="bad", seq=0, online=True).to_json())
    return [
        (topics.station("bad", p.Channel.DECISION), b"garbage"),
        (topics.station("bad", p.Channel.SHADOW),
         shadow("s2", 0, "s2-p0", "ok", "defect").to_json()),
        (topics.station("bad", p.Channel.ACK), json.dumps({**ack, "command": "\udc80"}).encode()),
        (topics.station("bad", p.Channel.STATE),
         json.dumps({**state, "agent_version": "\ud800"}).encode()),
    ]


def test_a_station_flooding_invalid_messages_does_not_starve_the_others(
    controller: Controller, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deploy.controller")
    collector = Collector(broker.url)
    flooder, good = link(broker, "station-bad"), link(broker, "station-s2")
    payloads = flood_payloads(controller.topics)
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        while flooding.is_set():
            tickets = [flooder.publish(topic, payload, qos=1)
                       for _ in range(50) for topic, payload in payloads]
            tickets[-1].wait(10)

    flood_thread = threading.Thread(target=flood, name="flood", daemon=True)
    flood_thread.start()
    decisions = [decision("s2", seq) for seq in range(50)]
    topic = controller.topics.station("s2", p.Channel.DECISION)

    def receipted() -> bool:
        if any(r.upto_seq >= 49 for r in collector.of(p.Receipt, "s2")):
            return True
        # As the station's outbox does: what is not receipted yet goes again.
        for message in decisions[controller.store.contiguous("s2") + 1:]:
            good.publish(topic, message.to_json(), qos=1)
        return False

    try:
        wait_for(lambda: controller.counters.invalid >= 100, 30, "the flood to arrive")
        wait_for(receipted, 60, "s2's 50 decisions to be receipted during the flood")
        assert controller.counters.invalid >= 100 and flooding.is_set()
    finally:
        flooding.clear()
        flood_thread.join(30)
        flooder.stop()
        good.stop()
        collector.close()

    assert next(t for t in controller._threads if t.name == "ingest").is_alive()
    # No batch failed: a message that cannot be stored is refused alone, not with its batch.
    assert controller.counters.failed_batches == 0
    assert controller.store.contiguous("bad") == -1
    assert [r.station for r in controller.store.stations()] == ["s2"]
    logged = [r.getMessage() for r in caplog.records if "invalid message" in r.getMessage()]
    assert len(logged) == 1, logged[:3]
    assert "station bad" in logged[0]
