"""The outbox relay as the agent runs it: a child process on a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.relay import RelayProcess, RelaySpec
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import (
    Receipter,
    leave_subscribed_session,
    queued_for_session,
    station_config,
    wait_for,
)
from tests.unit.test_store import decision

STATION = "st-1"


def spec(data_dir: Path, url: str) -> RelaySpec:
    return RelaySpec(
        station=STATION, topic_prefix=p.DEFAULT_PREFIX, data_dir=data_dir,
        max_outbox_rows=1000, publish_batch=50, resend_after_s=5.0,
        broker=LinkConfig(url=url, client_id=STATION),
    )


def test_the_child_publishes_on_wake_applies_receipts_and_stops_when_told(
    tmp_path: Path, broker: Broker
) -> None:
    receipter = Receipter(broker.url)
    topic = p.Topics().station(STATION, p.Channel.DECISION)
    relay = RelayProcess(spec(tmp_path, broker.url))
    try:
        with StationStore(tmp_path) as store:
            relay.start()
            for n in range(30):
                store.enqueue(topic, 1, decision(f"part-{n}"))
                relay.wake()
            wait_for(lambda: store.outbox_depth() == 0, 20, "every row receipted")
            assert sorted(receipter.stored[STATION]) == list(range(30))
            # Ctrl-C at a terminal and a service manager's SIGTERM go to the whole group: the
            # relay leaves stopping to the agent, which still has messages to deliver.
            pid = relay.pid
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            store.enqueue(topic, 1, decision("part-after-signals"))
            relay.wake()
            wait_for(lambda: store.outbox_depth() == 0, 20, "the row after the signals")
            assert relay.alive()
        relay.stop()
        assert not relay.alive() and relay.pid is None
    finally:
        relay.stop()
        receipter.close()


def test_the_child_exits_when_its_agent_dies(tmp_path: Path, broker: Broker) -> None:
    relay = RelayProcess(spec(tmp_path, broker.url))
    relay.start()
    process = relay._process  # noqa: SLF001 - the agent's side of the pipe, closed as by a crash
    assert process is not None and process.stdin is not None
    process.stdin.close()  # what the kernel does to every descriptor of a killed agent
    assert process.wait(timeout=10) == 0
    relay.stop()


def test_an_invalid_spec_stops_the_child_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.relay", "--wake-fd", "0"],
        input=b'{"station": "st-1", "publish_batch": 0}\n', capture_output=True, timeout=30,
        check=False,
    )
    assert result.returncode != 0
    error = result.stderr.decode()
    assert "invalid spec" in error and "publish_batch" in error and "data_dir" in error


def test_a_wake_up_after_stop_writes_to_no_descriptor(tmp_path: Path, broker: Broker) -> None:
    relay = RelayProcess(spec(tmp_path, broker.url))
    relay.start()
    relay.stop()
    read_end, write_end = os.pipe()  # likely to reuse the stopped relay's descriptor numbers
    try:
        os.set_blocking(read_end, False)
        relay.wake()
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_upgraded_station_drops_the_receipt_subscription_its_old_agent_left(
    tmp_path: Path, broker: Broker
) -> None:
    """Receipts go to the relay's connection; the agent's own session must not queue them."""
    config = station_config(tmp_path, broker.url, max_parts=3)
    topic = p.Topics(config.topic_prefix).station(config.station, p.Channel.RECEIPT)
    leave_subscribed_session(config.broker, topic)  # an older build's agent took receipts

    receipter = Receipter(broker.url)
    try:
        assert Agent(config).run() == 0
    finally:
        receipter.close()
    controller = MqttLink(LinkConfig(url=broker.url, client_id="controller-probe"))
    controller.start()
    try:
        assert controller.wait_connected(10)
        assert all(controller.publish(topic, b"receipt").wait(10) for _ in range(3))
        queued = queued_for_session(config.broker, topic, controller)
        assert queued == [], f"queued for the agent's old subscription: {queued}"
    finally:
        controller.stop()
