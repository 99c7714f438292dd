"""Several people driving one rollout through the controller's API: a retried Approve, a late
Abort. A real controller, real agents with the shipped models, a real mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.client import ControllerClient, ControllerError
from deploy.controller import Controller
from linesight.broker import Broker
from tests.support import V2, AgentLine, served_controller, wait_for

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

STATIONS = ("st-1", "st-2")
TWO_APPROVALS = """
name: two approvals
promote_without_evidence: true
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: promote st-1
    stations: [st-1]
    mode: promote
    approval: true
  - name: promote st-2
    stations: [st-2]
    mode: promote
    approval: true
"""
PROMOTE_ST1 = """
name: promote st-1
promote_without_evidence: true
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: promote st-1
    stations: [st-1]
    mode: promote
"""


@pytest.fixture
def line(tmp_path: Path, broker: Broker) -> Iterator[AgentLine]:
    running = AgentLine(broker.url, tmp_path, STATIONS, operated=())
    yield running
    running.stop()


@pytest.fixture
def controller(line: AgentLine) -> Iterator[tuple[Controller, ControllerClient]]:
    with served_controller(line.root, line.broker_url) as served:
        line.start()
        ctl = served[0]
        wait_for(lambda: len(ctl.fleet()) == 2 and all(v.online for v in ctl.fleet().values()),
                 30, "two stations online")
        yield served


def current(client: ControllerClient) -> dict[str, Any]:
    doc = client.current()
    assert doc is not None
    return doc


def waiting_at(client: ControllerClient, stage: int) -> bool:
    doc = current(client)
    return bool(doc["phase"] == "waiting_approval" and doc["stage"] == stage)


def active_versions(line: AgentLine) -> dict[str, str]:
    return {name: agent.slots.active.ref.version for name, agent in line.agents.items()}


def test_an_approve_sent_again_does_not_approve_the_next_stage(
    line: AgentLine, controller: tuple[Controller, ControllerClient]
) -> None:
    """A supervisor approves stage 1; the answer is slow, so the browser (or the supervisor,
    re-running the command) sends the same Approve again. Meanwhile stage 2 passed and waits
    for its own approval: the repeated request names stage 1 and must not approve stage 2."""
    _, client = controller
    rollout_id = client.start_rollout(TWO_APPROVALS, "part-classifier", "2.0.0")["rollout_id"]
    wait_for(lambda: waiting_at(client, 0), 60, "stage 1 waiting for its approval")
    path = f"/api/rollouts/{rollout_id}/approve"
    approved = client.post(path, {"by": "alice", "stage": 0})
    assert approved["stage"] >= 1, approved
    wait_for(lambda: waiting_at(client, 1), 60, "stage 2 waiting for its approval")
    with pytest.raises(ControllerError) as refused:
        client.post(path, {"by": "alice", "stage": 0})  # the same request, again
    assert refused.value.status == 409
    assert "stage 1 'promote st-1'" in str(refused.value), refused.value
    assert "stage 2 'promote st-2'" in str(refused.value), refused.value
    assert waiting_at(client, 1), current(client)  # not promoted on the repeated request
    # The approval meant for stage 2 goes through.
    client.post(path, {"by": "bob", "stage": 1})
    wait_for(lambda: current(client)["phase"] == "promoted", 60, "the rollout promoted")
    history = "\n".join(current(client)["history"])
    assert history.count("approved by alice") == 1 and "approved by bob" in history, history


def test_a_late_abort_does_not_undo_a_promotion(
    line: AgentLine, controller: tuple[Controller, ControllerClient]
) -> None:
    """A supervisor clicks Abort on a rollout that promoted a moment before: there is nothing
    left to abort, and the promotion of every station must stay. Undoing it is Rollback's
    deliberate job."""
    _, client = controller
    client.start_rollout(PROMOTE_ST1, "part-classifier", "2.0.0")
    wait_for(lambda: current(client)["phase"] == "promoted", 60, "the rollout promoted")
    wait_for(lambda: active_versions(line)["st-1"] == "2.0.0", 30, "2.0.0 active on st-1")
    with pytest.raises(ControllerError) as refused:
        client.act("abort", by="carol", reason="stop it")
    assert refused.value.status == 409
    assert "promoted" in str(refused.value) and "rollback" in str(refused.value), refused.value
    doc = current(client)
    assert doc["phase"] == "promoted" and not doc["pending_commands"], doc
    assert active_versions(line)["st-1"] == "2.0.0"
