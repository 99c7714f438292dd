"""Nothing is lost and nothing is counted twice when the broker or the agent dies (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.relay import RelayProcess
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from tests.support import (
    DEMO_PUB,
    V1,
    Collector,
    Receipter,
    children_of,
    process_gone,
    station_config,
    wait_for,
)


def contiguous(stored: dict[int, p.Envelope]) -> bool:
    return sorted(stored) == list(range(len(stored)))


def test_broker_killed_mid_run_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(tmp_path, broker.url, source="synthetic:seed=5,rate=40",
                            automation="full", max_parts=200, outbox__receipt_wait_s=30)
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(collector.of(p.Decision)) >= 20, 30, "20 decisions")
        broker.kill()
        inspected_at_kill = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected >= inspected_at_kill + 40, 30,
                 "inspection to go on while the broker is down")
        broker.restart()
        # --max-parts: the agent ends once every message it owes is receipted.
        thread.join(90)
        assert not thread.is_alive(), "the agent did not finish delivering"
        assert agent.parts_inspected == 200
        # The receipting subscriber (the controller's role) has every decision; copies that
        # arrived twice carry the same msg_id, so storing by msg_id or seq collapses them.
        stored = receipter.stored["press-01"]
        assert contiguous(stored)
        decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
        assert len(decisions) == 200 and len({d.part_id for d in decisions}) == 200
        ids_per_seq: dict[int, set[object]] = {}
        for message in receipter.deliveries:
            ids_per_seq.setdefault(message.seq, set()).add(message.msg_id)
        assert all(len(ids) == 1 for ids in ids_per_seq.values()), "a re-sent message is the same"
        # A subscriber that kept its session sees no message it did not get exactly once.
        assert all(len(ids) == 1 for ids in _ids_by_seq(collector.of(p.Decision)).values())
    finally:
        agent.stop()
        thread.join(30)
        receipter.close()
        collector.close()
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 0, "every message was receipted and dropped from the outbox"


def test_a_killed_outbox_relay_is_restarted_and_nothing_is_lost(
    tmp_path: Path, broker: Broker
) -> None:
    receipter = Receipter(broker.url)
    config = station_config(tmp_path, broker.url, source="synthetic:seed=6,rate=40",
                            automation="full", max_parts=160, outbox__receipt_wait_s=30)
    agent = Agent(config)
    assert isinstance(agent.relay, RelayProcess), "the relay runs in its own process by default"
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(receipter.stored.get("press-01", {})) >= 20, 30, "20 messages")
        first = agent.relay.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "outbox_relay" in agent.faults, 10, "the outbox_relay fault")
        assert "exit code -9" in agent.faults["outbox_relay"].message
        wait_for(lambda: agent.relay.pid not in (None, first) and agent.relay.alive(), 10,
                 "a new relay")
        thread.join(90)
        assert not thread.is_alive(), "the agent did not finish delivering"
        stored = receipter.stored["press-01"]
        assert contiguous(stored)
        decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
        assert len(decisions) == 160 and len({d.part_id for d in decisions}) == 160
        assert agent.relay.starts == 2
        assert not agent.relay.alive(), "the relay stops with the agent"
    finally:
        agent.stop()
        thread.join(30)
        receipter.close()
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 0



def _ids_by_seq(messages: list[p.Decision]) -> dict[int, set[object]]:
    ids: dict[int, set[object]] = {}
    for message in messages:
        ids.setdefault(message.seq, set()).add(message.msg_id)
    return ids


def agent_process(
    data_dir: Path, broker: Broker, *extra: str, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable, "-m", "linesight.cli", "agent", "--station", "press-09",
                "--broker", broker.url, "--source", "synthetic:seed=8,rate=40",
                "--active", str(V1), "--automation", "full", "--data-dir", str(data_dir),
                "--key", str(DEMO_PUB), *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )


def test_agent_killed_mid_run_replays_its_outbox(tmp_path: Path, broker: Broker) -> None:
    collector = Collector(broker.url)
    log = tmp_path / "agent.log"
    first = agent_process(tmp_path / "data", broker, log=log)
    try:
        # No receipts yet: everything the first run inspects stays owed in its outbox. Counted
        # by msg_id: the relay's replay on connect may repeat what its first pass just sent.
        wait_for(lambda: len(collector.unique(p.Decision, "press-09")) >= 25, 60, "25 decisions")
        relays = children_of(first.pid)
        assert len(relays) == 1, "the agent runs its outbox relay as a child process"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    wait_for(lambda: process_gone(relays[0]), 10, "the relay to exit with its killed agent")
    with StationStore(tmp_path / "data") as store:
        owed = store.outbox_depth()
        last_before = store.last_seq()
    assert owed >= 25 and last_before >= 24
    receipter = Receipter(broker.url)
    try:
        second = agent_process(tmp_path / "data", broker, "--max-parts", "10",
                               "--receipt-wait", "20", log=log)
        second.wait(timeout=90)
        assert second.returncode == 0, log.read_text()[-3000:]
        stored = receipter.stored["press-09"]
        wait_for(lambda: contiguous(stored) and len(stored) == last_before + 11, 20,
                 "the replayed and the new messages")
        decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
        assert len(decisions) == last_before + 11
        assert len({d.part_id for d in decisions}) == len(decisions), (
            "the restarted synthetic source goes on instead of judging its first parts again"
        )
        assert max(stored) == last_before + 10, "seq continues where the killed run stopped"
    finally:
        receipter.close()
        collector.close()
    with StationStore(tmp_path / "data") as store:
        assert store.outbox_depth() == 0
        assert store.last_seq() == last_before + 10
