"""A station's credentials let whoever holds them publish on its topics; a message far larger than
any station sends must not make the controller build gigabytes of objects (a 256 MB MQTT payload
of nested empty lists is about 20 times that in Python)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.controller import MAX_MESSAGE_BYTES, Controller
from linesight import protocol as p
from linesight.mqtt import ReceivedMessage
from tests.support import unstarted_controller

pytestmark = pytest.mark.unit

TOPIC = "linesight/v1/stations/press-01/state"


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    controller = unstarted_controller(tmp_path)
    try:
        yield controller
    finally:
        controller.store.close()


def test_a_huge_payload_is_dropped_before_it_is_parsed(controller: Controller) -> None:
    count = 1_000_000
    payload = b'{"schema":"linesight/v1","x":[' + b"[]," * count + b"[]]}"
    assert len(payload) > MAX_MESSAGE_BYTES
    tracemalloc.start()
    try:
        controller.ingest([ReceivedMessage(TOPIC, payload, 1, False)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert controller.counters.invalid == 1
    assert peak < 2 * len(payload), f"{peak / 1e6:.0f} MB for a {len(payload) / 1e6:.0f} MB payload"


def test_the_largest_state_a_station_sends_is_still_taken(controller: Controller) -> None:
    now = datetime.now(UTC)
    faults = [p.Fault(code=f"fault_{index}", message="x" * 2000, since=now) for index in range(40)]
    state = p.StationState(station="press-01", seq=0, online=True, faults=faults,
                           automation_note="n" * 600, labels={"line": "l" * 200})
    payload = state.to_json()
    assert len(payload) < MAX_MESSAGE_BYTES
    controller.ingest([ReceivedMessage(TOPIC, payload, 1, False)])
    assert controller.counters.invalid == 0
    assert [record.station for record in controller.store.stations()] == ["press-01"]
