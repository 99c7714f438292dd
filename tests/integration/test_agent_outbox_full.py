"""A full outbox: decisions are kept, shadow results are dropped, and the station says how many
in its metrics and with the `outbox_full` fault. Real agent and bundles; no broker (nothing is
receipted, so the outbox fills)."""

from __future__ import annotations

import threading
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from tests.support import V2, station_config, wait_for


def test_shadow_results_a_full_outbox_refuses_are_counted_in_the_metrics(
    tmp_path: Path,
) -> None:
    config = station_config(
        tmp_path, "mqtt://127.0.0.1:1", candidate=V2, mode="shadow", automation="full",
        source="synthetic:seed=3,rate=200", outbox__max_rows=100, outbox__relay="thread",
        outbox__receipt_wait_s=0.2, state_interval_s=0.2,
    )
    agent = Agent(config)
    finished = threading.Event()
    threading.Thread(target=lambda: (agent.run(), finished.set()), daemon=True).start()

    def dropped_metric() -> float:
        return agent.metrics.registry.get_sample_value(
            "linesight_shadow_results_dropped", {"station": "press-01"}) or 0.0

    try:
        wait_for(lambda: agent.store.shadow_dropped >= 5, 60, "shadow results refused")
        wait_for(lambda: dropped_metric() >= 5, 30, "the refused results in the metrics")
        assert "outbox_full" in agent.faults
    finally:
        agent.stop()
        assert finished.wait(30)
    with StationStore(tmp_path) as store:
        assert dropped_metric() <= store.shadow_dropped
        topics = [row.topic for row in store.pending(10_000)]
    decisions = sum(topic.endswith("/" + p.Channel.DECISION.value) for topic in topics)
    assert decisions == agent.parts_inspected, "a full outbox must never cost a decision"
