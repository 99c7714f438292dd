"""A disk that hangs (a stuck NFS or USB disk, an fsync that takes minutes): the station stops
taking parts once `storage.write_queue` items wait for the disk, says so with the
`store_stalled` fault, and stores every part it decided once the disk answers again. Real agent
and bundle, real store; the hang is a commit held on an event (a paused fsync). No broker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from tests.support import station_config, wait_for

BOUND = 150  # storage.write_queue (600 by default)
PART_ITEMS = 3  # a part hands the writer at most a decision, a review item and a part log entry
PARTS = 300  # more than the parts whose items fill the queue


def test_a_hanging_disk_stops_the_inspection_instead_of_filling_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", automation="full",
                            source="synthetic:seed=5", max_parts=PARTS, storage__write_queue=BOUND,
                            outbox__relay="thread",
                            outbox__receipt_wait_s=0.2, state_interval_s=0.2)
    agent = Agent(config)
    answering = threading.Event()  # set: the disk answers again
    commit = agent.store.enqueue_many

    def hanging_commit(*args: Any, **kwargs: Any) -> Any:
        answering.wait()
        return commit(*args, **kwargs)

    monkeypatch.setattr(agent.store, "enqueue_many", hanging_commit)
    finished = threading.Event()

    def run() -> None:
        agent.run()
        finished.set()

    threading.Thread(target=run, daemon=True).start()

    def stalled_events() -> float:
        return agent.metrics.registry.get_sample_value(
            "linesight_fault_events_total", {"station": "press-01", "code": "store_stalled"}
        ) or 0.0

    try:
        wait_for(lambda: "store_stalled" in agent.faults
                 or agent.writer.backlog > BOUND + PART_ITEMS, 20, "a stall or a growing queue")
        assert agent.writer.backlog <= BOUND + PART_ITEMS, "the writer's queue grows unbounded"
        assert "store_stalled" in agent.faults
        assert "store_stalled" in {f.code for f in agent._state(online=True).faults}
        assert stalled_events() == 1
        message = agent.faults["store_stalled"].message
        assert "storage.write_queue" in message and "not inspected" in message
        inspected = agent.parts_inspected
        assert agent.writer.backlog <= BOUND + PART_ITEMS
        answering.set()  # the disk answers again: every part waiting is stored, and on it goes
        wait_for(lambda: "store_stalled" not in agent.faults, 20, "the fault to clear")
        assert finished.wait(30), "the station did not go on to its last part"
        assert agent.parts_inspected == PARTS > inspected
    finally:
        answering.set()
        agent.stop()
        assert finished.wait(30)
    assert stalled_events() == 1
    with StationStore(tmp_path) as store:
        topics = [row.topic for row in store.pending(100_000)]
    decisions = sum(topic.endswith("/" + p.Channel.DECISION.value) for topic in topics)
    assert decisions == agent.parts_inspected, "every part decided during the stall is stored"
