"""What a station holds in memory over months of running: nothing that grows with time while
the broker is away."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight import protocol as p
from linesight.broker import Broker
from tests.support import Collector, station_config, wait_for

STATION = "press-01"
A_DAY_OF_STATES = 2880  # one state every state_interval_s (30 s by default)


@pytest.fixture
def agent(tmp_data_dir: Path, broker: Broker) -> Iterator[Agent]:
    """A station whose own link is connected; nothing else runs (the test drives it)."""
    built = Agent(station_config(tmp_data_dir, broker.url, station=STATION,
                                 outbox__relay="thread"))
    built.link.add_connect_listener(built._on_connected)  # as run() does
    built.link.start()
    assert built.link.wait_connected(10), "the station could not connect"
    try:
        yield built
    finally:
        built.link.stop()
        built.writer.close()
        built.gate.close()
        built.source.close()
        built.store.close()


def _allocated_by(action: Callable[[], None]) -> int:
    """Bytes still allocated after `action()` ran, that were not before."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        action()
        gc.collect()  # garbage not yet collected is not kept
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_a_day_without_a_broker_queues_no_states(agent: Agent, broker: Broker) -> None:
    """Each state published while the broker is away used to wait in the MQTT client's memory
    (a QoS 1 message, up to 65,535 of them), to be sent, stale, in one flood at reconnect."""
    broker.stop()
    wait_for(lambda: not agent.link.connected, 30, "the station to notice the broker is gone")

    def a_day() -> None:
        for _ in range(A_DAY_OF_STATES):
            agent._publish_state()

    grown = _allocated_by(a_day)
    assert grown < 256 * 1024, f"a day of states without a broker kept {grown} bytes"

    # What matters is not lost: the newest state goes out once the broker is back.
    agent.parts_inspected = 12345
    broker.restart()
    wait_for(lambda: agent.link.connected, 60, "the station to reconnect")
    wait_for(agent._state_dirty.is_set, 10, "the reconnect to ask for the state")
    agent._publish_state()  # what housekeeping does for a dirty state
    collector = Collector(broker.url)
    try:
        wait_for(lambda: any(s.parts_inspected == 12345
                             for s in collector.of(p.StationState, STATION)),
                 30, "the newest state, retained")
    finally:
        collector.close()
