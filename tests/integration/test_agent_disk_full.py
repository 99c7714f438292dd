"""A decision that cannot be stored (a full or failing disk) is still signalled to the line: a
part to reject must not go on for want of disk. Real agent, real bundle; no broker."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.actuator import InlineGate, PartSignal
from edge_agent.agent import Agent
from linesight import protocol as p
from tests.support import station_config


def test_a_decision_the_disk_cannot_take_still_reaches_the_reject_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", automation="full",
                            source="synthetic:seed=11,defect_rate=1.0", max_parts=20,
                            outbox__relay="thread", outbox__receipt_wait_s=0.2)
    agent = Agent(config)
    signalled: list[PartSignal] = []
    errors: list[str] = []

    class Recorder:
        def act(self, decision: PartSignal) -> None:
            signalled.append(decision)

    agent.gate = InlineGate(Recorder(), on_error=errors.append)

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(agent.store, "enqueue_many", disk_full)
    assert agent.run() == 0
    assert agent.parts_inspected == 20
    assert "outbox_write" in agent.faults
    assert [s.part_id for s in signalled] == [f"syn-11-{i:08d}" for i in range(20)]
    assert all(s.seq is None and s.station == "press-01" for s in signalled)
    rejected = [s for s in signalled if s.action == p.Action.REJECT]
    assert rejected, "every part is defective: some must have been rejected"
    assert all(s.decided_by == p.DecidedBy.ACTIVE for s in rejected)
    assert errors == []
