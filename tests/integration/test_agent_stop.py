"""Stopping: a stop request (SIGTERM, Ctrl-C) that arrives while a --max-parts run waits for its
receipts ends the wait as one before it would have. Real agent and bundles; no broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from tests.support import station_config, wait_for


def test_a_stop_during_the_wait_for_receipts_ends_it(tmp_path: Path) -> None:
    agent = Agent(station_config(tmp_path, "mqtt://127.0.0.1:1", max_parts=3,
                                 outbox__relay="thread", outbox__receipt_wait_s=60))
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    wait_for(lambda: agent.parts_inspected >= 3 and not agent._loop_running, 30,
             "the run to reach its wait for receipts")
    time.sleep(0.5)
    started = time.monotonic()
    agent.stop()  # what the SIGTERM and SIGINT handlers call
    thread.join(20)
    assert not thread.is_alive(), "the stop request did not end the wait for receipts"
    assert time.monotonic() - started < 10
    assert result == [0]
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 3, "what is owed stays in the outbox for the next start"
