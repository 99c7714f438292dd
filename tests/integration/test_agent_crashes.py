"""Nothing is lost and nothing is counted twice when the broker or the agent dies (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from tests.support import DEMO_PUB, V1, Collector, Receipter, station_config, wait_for


def contiguous(stored: dict[int, p.Envelope]) -> bool:
    return sorted(stored) == list(range(len(stored)))


def test_broker_killed_mid_run_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(tmp_path, broker.url, source="synthetic:seed=5,rate=40",
                            automation="full")
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(collector.of(p.Decision)) >= 20, 30, "20 decisions")
        broker.kill()
        inspected_at_kill = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected >= inspected_at_kill + 20, 30,
                 "inspection to go on while the broker is down")
        broker.restart()
        wait_for(lambda: agent.parts_inspected >= inspected_at_kill + 40, 30, "more parts")
    finally:
        agent.stop()
        thread.join(30)
    total = agent.parts_inspected
    try:
        wait_for(lambda: len(collector.unique(p.Decision)) >= total, 30, "every decision")
        decisions = collector.unique(p.Decision)
        assert len(decisions) == total, "each decision exactly once by msg_id"
        assert len({d.seq for d in decisions}) == total, "one msg_id per seq: nothing re-made"
        assert len({d.part_id for d in decisions}) == total
        assert contiguous(receipter.stored["press-01"])
    finally:
        receipter.close()
        collector.close()
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 0, "every message was receipted and dropped from the outbox"


def agent_process(data_dir: Path, broker: Broker, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "linesight.cli", "agent", "--station", "press-09",
            "--broker", broker.url, "--source", "synthetic:seed=8,rate=40", "--active", str(V1),
            "--automation", "full", "--data-dir", str(data_dir), "--key", str(DEMO_PUB), *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_agent_killed_mid_run_replays_its_outbox(tmp_path: Path, broker: Broker) -> None:
    collector = Collector(broker.url)
    first = agent_process(tmp_path, broker)
    try:
        # No receipts yet: everything the first run inspects stays owed in its outbox.
        wait_for(lambda: len(collector.of(p.Decision, "press-09")) >= 25, 60, "25 decisions")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    with StationStore(tmp_path) as store:
        owed = store.outbox_depth()
        last_before = store.last_seq()
    assert owed >= 25 and last_before >= 24
    receipter = Receipter(broker.url)
    try:
        second = agent_process(tmp_path, broker, "--max-parts", "10", "--receipt-wait", "20")
        _, stderr = second.communicate(timeout=90)
        assert second.returncode == 0, stderr.decode()[-2000:]
        stored = receipter.stored["press-09"]
        wait_for(lambda: contiguous(stored) and len(stored) == last_before + 11, 20,
                 "the replayed and the new messages")
        decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
        assert len(decisions) == last_before + 11
        assert max(stored) == last_before + 10, "seq continues where the killed run stopped"
    finally:
        receipter.close()
        collector.close()
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 0
        assert store.last_seq() == last_before + 10
