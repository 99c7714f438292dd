"""The controller hands the rollout each ack with the station it came from.

The controller is built but never started: no broker, no threads. What it would publish waits in
the MQTT client's memory and is dropped with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.config import ControllerConfig
from deploy.controller import Controller
from deploy.rollout import RolloutState, StageStep, Tick, start, transition
from linesight import protocol as p
from linesight.mqtt import LinkConfig, ReceivedMessage
from tests.unit.test_rollout import CANDIDATE, FLEET, Clock, plan


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    config = ControllerConfig(
        broker=LinkConfig(url="mqtt://127.0.0.1:1", client_id="unit-controller"),
        data_dir=tmp_path / "data", bundles=tmp_path / "bundles",
    )
    controller = Controller(config)
    try:
        yield controller
    finally:
        controller.store.close()


def deploying(controller: Controller) -> RolloutState:
    """A rollout whose first stage has sent deploy_candidate to s1."""
    clock = Clock()
    state, sends = transition(start("r-1", plan(), CANDIDATE, clock.now), Tick(FLEET),
                              clock.step())
    assert [(s.station, s.body.name) for s in sends] == [("s1", "deploy_candidate")]
    controller.rollout = state
    return state


def ack_from(controller: Controller, station: str, cmd_id: str, *, ok: bool) -> None:
    ack = p.CommandAck(station=station, seq=0, cmd_id=uuid.UUID(cmd_id),
                       command="deploy_candidate", ok=ok, error=None if ok else "refused")
    topic = controller.topics.station(station, p.Channel.ACK)
    controller.ingest([ReceivedMessage(topic, ack.to_json(), 1, False)])


@pytest.mark.parametrize("ok", [True, False])
def test_only_the_commanded_station_can_answer_its_command(
    controller: Controller, ok: bool
) -> None:
    state = deploying(controller)
    ack_from(controller, "s2", state.pending[0].cmd_id, ok=ok)
    assert controller.rollout == state, "an ack on s2's topic does not answer s1's command"
    ack_from(controller, "s1", state.pending[0].cmd_id, ok=True)
    assert controller.rollout is not None
    assert controller.rollout.record.step == StageStep.OBSERVING
    assert controller.rollout.deployed == ["s1"]
