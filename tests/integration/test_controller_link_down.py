"""The fleet controller while its link to the broker is down: a real controller, a real
mosquitto stopped and started again, and a stand-in station on its own persistent session."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.client import ControllerClient
from deploy.controller import Controller
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage
from tests.support import V2, served_controller, wait_for

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

TOPICS = p.Topics(p.DEFAULT_PREFIX)
SHADOW_S1 = """
name: shadow s1
command_timeout_s: 60
command_retry_s: 0.2
stages:
  - name: shadow on s1
    stations: [s1]
    mode: shadow
    exit: {min_parts: 1000, min_labelled_disagreements: 10, max_duration_s: 3600}
  - name: promote s1
    stations: [s1]
    mode: promote
"""
OUTAGE_S = 0.8
"""How long the broker stays away: several of the plan's command_retry_s."""


class Station:
    """Station s1 as the controller sees it: its retained state, and the commands that reach
    it on a persistent session (kept by the broker while the station is away)."""

    def __init__(self, url: str) -> None:
        self.commands: list[p.Command] = []
        self._lock = threading.Lock()
        self.link = MqttLink(LinkConfig(url=url, client_id="station-s1"))
        self.link.subscribe(TOPICS.station("s1", p.Channel.CMD), self._on_command)
        self.link.start()
        assert self.link.wait_connected(10), "the station could not connect"
        state = p.StationState(station="s1", seq=0, online=True)
        self.link.publish(TOPICS.station("s1", p.Channel.STATE), state.to_json(), qos=1,
                          retain=True).wait(5)

    def _on_command(self, message: ReceivedMessage) -> None:
        with self._lock:
            self.commands.append(p.Command.model_validate_json(message.payload))

    def received(self) -> list[p.Command]:
        with self._lock:
            return list(self.commands)

    def ack(self, command: p.Command, seq: int) -> None:
        ack = p.CommandAck(station="s1", seq=seq, cmd_id=command.cmd_id,
                           command=command.body.name, ok=True)
        self.link.publish(TOPICS.station("s1", p.Channel.ACK), ack.to_json(), qos=1)


def retained_status(url: str) -> p.RolloutStatus:
    """The rollout status the broker keeps for whoever subscribes next."""
    found: list[p.RolloutStatus] = []
    link = MqttLink(LinkConfig(url=url, client_id=f"reader-{uuid.uuid4().hex[:8]}",
                               clean_start=True))
    link.subscribe(TOPICS.rollout(),
                   lambda m: found.append(p.RolloutStatus.model_validate_json(m.payload)))
    link.start()
    try:
        wait_for(lambda: bool(found), 10, "the retained rollout status")
        return found[-1]
    finally:
        link.stop()


@pytest.fixture
def running(tmp_path: Path, broker: Broker) -> Iterator[tuple[Controller, ControllerClient]]:
    with served_controller(tmp_path, broker.url, tick_s=0.1) as served:
        yield served


def test_nothing_is_queued_while_the_broker_is_away_and_what_is_owed_goes_out_after(
    broker: Broker, running: tuple[Controller, ControllerClient]
) -> None:
    """While the broker is away the controller used to hand paho every retry of its commands
    and every status it composed, to be sent, stale, in one burst at reconnect (and held in
    memory for as long as the outage lasted). Now it composes nothing while the link is down;
    once it is back it publishes its current status and sends each command still unacked."""
    controller, client = running
    station = Station(broker.url)
    try:
        wait_for(lambda: "s1" in controller.fleet() and controller.fleet()["s1"].online, 10,
                 "the controller to see s1 online")
        client.start_rollout(SHADOW_S1, "part-classifier", "2.0.0")
        wait_for(lambda: bool(station.received()), 10, "the first deploy_candidate")
        broker.kill()  # a power cut: only what mosquitto autosaved survives
        wait_for(lambda: not controller.link.connected, 10, "the controller to lose the link")
        went_down = datetime.now(UTC)
        client.act("pause", by="alice")  # a supervisor acts during the outage
        time.sleep(OUTAGE_S)  # the retries that used to pile up in paho's memory
        came_back = datetime.now(UTC)
        broker.restart()
        wait_for(lambda: controller.link.connected, 30, "the controller to reconnect")

        # The command still unacked reaches the station again, composed after the outage.
        pending = controller.rollout.pending if controller.rollout else []
        assert [c.station for c in pending] == ["s1"], pending
        cmd_id = uuid.UUID(pending[0].cmd_id)
        wait_for(lambda: any(c.ts >= came_back and c.cmd_id == cmd_id
                             for c in station.received()), 10,
                 "the unacked command sent again after the outage")
        stale = [c.ts for c in station.received() if went_down <= c.ts < came_back]
        assert not stale, f"{len(stale)} commands composed while the broker was away"
        # The status retained on the broker is the current one: paused during the outage.
        status = retained_status(broker.url)
        assert status.phase == "paused", status
        assert status.ts >= came_back, status

        # Acked, the command is settled as usual.
        station.ack(next(c for c in station.received() if c.cmd_id == cmd_id), seq=0)
        wait_for(lambda: controller.rollout is not None and not controller.rollout.pending,
                 10, "the ack to settle the command")
    finally:
        station.link.stop()


def test_a_rollback_asked_for_while_the_broker_is_away_reaches_the_station_after(
    broker: Broker, running: tuple[Controller, ControllerClient]
) -> None:
    """An abort taken while the broker is away is saved at once; its rollback, which used to
    wait in paho's memory, goes out once the link is back, and is not lost."""
    controller, client = running
    station = Station(broker.url)
    try:
        wait_for(lambda: "s1" in controller.fleet() and controller.fleet()["s1"].online, 10,
                 "the controller to see s1 online")
        client.start_rollout(SHADOW_S1, "part-classifier", "2.0.0")
        wait_for(lambda: bool(station.received()), 10, "the first deploy_candidate")
        station.ack(station.received()[0], seq=0)
        wait_for(lambda: controller.rollout is not None and not controller.rollout.pending,
                 10, "the deploy acked")
        broker.kill()
        wait_for(lambda: not controller.link.connected, 10, "the controller to lose the link")
        client.act("abort", by="alice", reason="wrong bundle")
        assert controller.rollout is not None
        assert controller.rollout.phase.value == "rolling_back", controller.rollout.history
        came_back = datetime.now(UTC)
        broker.restart()
        wait_for(lambda: any(c.body.name == "rollback" for c in station.received()), 10,
                 "the rollback to reach the station")
        rollbacks = [c for c in station.received() if c.body.name == "rollback"]
        assert all(c.ts >= came_back for c in rollbacks), rollbacks
        station.ack(rollbacks[0], seq=1)
        wait_for(lambda: controller.rollout is not None
                 and controller.rollout.phase.value == "aborted", 10, "the rollout aborted")
    finally:
        station.link.stop()
