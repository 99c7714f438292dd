"""A station whose storage is replaced under the same station id: nothing it sends is lost.

A wiped `data_dir` starts the station's seq again at 0. Its store numbers messages in a new seq
stream, so the controller stores them beside the old ones instead of taking them for copies,
and receipts them per stream.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from tests.support import served_controller, station_config

STATION = "press-09"


def inspect(data: Path, broker_url: str, parts: int) -> uuid.UUID:
    """Run the station for `parts` parts against the controller; its stream, once delivered."""
    config = station_config(data, broker_url, station=STATION, max_parts=parts)
    assert Agent(config).run() == 0
    with StationStore(data) as store:
        assert store.outbox_depth() == 0, "every message was receipted"
        assert store.stream is not None
        return store.stream


def test_a_station_whose_storage_was_replaced_loses_nothing(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / STATION
    with served_controller(tmp_path, broker.url) as (controller, _):
        first = inspect(data, broker.url, 20)
        shutil.rmtree(data)  # a new disk: the station starts again at seq 0
        second = inspect(data, broker.url, 15)
        assert second != first

        decisions = controller.store.decisions(station=STATION)
        assert len(decisions) == 35, "the new disk's decisions were not taken for copies"
        for stream, parts in ((first, 20), (second, 15)):
            ours = [d for d in decisions if d.stream == stream]
            assert len(ours) == parts
            assert [d.seq for d in ours] == sorted(d.seq for d in ours)
            assert controller.store.contiguous(STATION, stream) >= max(d.seq for d in ours)
            assert min(d.seq for d in ours) == 0, "each stream starts at seq 0"
        assert controller.store.contiguous(STATION) == -1, "no message came without a stream"
        assert {record.station for record in controller.store.stations()} == {STATION}
        assert all(isinstance(d, p.Decision) for d in decisions)
