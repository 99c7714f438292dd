"""Commands from the controller: deploy, promote, rollback, switch, and refusals, with acks."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, sha256_file
from linesight.broker import Broker
from linesight.command_auth import sign_command
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import (
    MODELS,
    V2,
    Collector,
    QuietFiles,
    Receipter,
    command,
    file_server,
    http_server,
    station_config,
    wait_for,
)

STATION = "press-07"



@pytest.fixture
def bundle_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    shutil.copytree(MODELS, root)
    with file_server(root) as base:
        yield base, root


@contextlib.contextmanager
def station_running(
    tmp_path: Path, broker: Broker, **overrides: object
) -> Iterator[tuple[Agent, Collector, MqttLink]]:
    collector = Collector(broker.url)
    receipter = Receipter(broker.url)
    config = station_config(
        tmp_path / "station", broker.url, station=STATION, source="synthetic:seed=3,rate=40",
        automation="partial", **overrides,
    )
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    sender = MqttLink(LinkConfig(url=broker.url, client_id="test-controller"))
    sender.start()
    assert sender.wait_connected(10)
    wait_for(lambda: len(collector.of(p.Decision, STATION)) > 5, 20, "the agent to inspect")
    yield agent, collector, sender
    agent.stop()
    thread.join(30)
    assert not thread.is_alive(), "the agent did not stop"
    sender.stop()
    receipter.close()
    collector.close()


@pytest.fixture
def running(tmp_path: Path, broker: Broker) -> Iterator[tuple[Agent, Collector, MqttLink]]:
    with station_running(tmp_path, broker) as station:
        yield station


def publish(sender: MqttLink, collector: Collector, payload: bytes, cmd_id: uuid.UUID
            ) -> p.CommandAck:
    """Send a command payload as it is; the station's next ack for `cmd_id`."""
    before = len(collector.acks(cmd_id))
    sender.publish(p.Topics().station(STATION, p.Channel.CMD), payload, qos=1)
    wait_for(lambda: len(collector.acks(cmd_id)) > before, 30, f"an ack for {cmd_id}")
    return collector.acks(cmd_id)[-1]


def send(sender: MqttLink, collector: Collector, body: object, *, raw: bytes | None = None,
         cmd_id: uuid.UUID | None = None) -> p.CommandAck:
    """A command with `body`, or `raw` bytes (acked under the nil cmd_id when unreadable)."""
    if raw is not None:
        return publish(sender, collector, raw, uuid.UUID(int=0))
    command = p.Command(station=STATION, seq=1, cmd_id=cmd_id or uuid.uuid4(), body=body)
    return publish(sender, collector, command.to_json(), command.cmd_id)


def deploy_body(base: str, root: Path, version: str) -> p.DeployCandidate:
    bundle = root / "part-classifier" / version
    return p.DeployCandidate(
        url=f"{base}/part-classifier/{version}/",
        model=p.ModelRef(name="part-classifier", version=version,
                         sha256=sha256_file(bundle / MANIFEST_FILE)),
        signature=(bundle / SIGNATURE_FILE).read_text().strip(),
        mode=p.DeploymentMode.SHADOW,
    )


def latest_state(collector: Collector) -> p.StationState:
    return [s for s in collector.of(p.StationState, STATION) if s.online][-1]


def test_deploy_promote_rollback_switch(
    running: tuple[Agent, Collector, MqttLink], bundle_server: tuple[str, Path]
) -> None:
    agent, collector, sender = running
    base, root = bundle_server

    ack = send(sender, collector, deploy_body(base, root, "2.0.0"))
    assert ack.ok, ack.error
    assert ack.state_after and ack.state_after.candidate
    assert ack.state_after.candidate.version == "2.0.0"
    wait_for(lambda: len(collector.of(p.ShadowResult, STATION)) > 3, 20, "shadow results")

    ack = send(sender, collector, p.SetMode(mode=p.DeploymentMode.BLUE_GREEN))
    assert ack.ok, ack.error
    ack = send(sender, collector, p.Switch(to="candidate"))
    assert ack.ok and ack.state_after and ack.state_after.serving == "candidate"
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: any(d.decided_by == "candidate"
                         for d in collector.of(p.Decision, STATION)[before:]), 20,
             "the candidate deciding after the switch")
    ack = send(sender, collector, p.Rollback(reason="test"))
    assert ack.ok and ack.state_after
    assert ack.state_after.candidate is None and ack.state_after.active
    assert ack.state_after.active.version == "1.0.0"

    ack = send(sender, collector, deploy_body(base, root, "2.0.0"))
    assert ack.ok, ack.error
    ack = send(sender, collector, p.Promote())
    assert ack.ok and ack.state_after and ack.state_after.active
    assert ack.state_after.active.version == "2.0.0"
    assert ack.state_after.previous and ack.state_after.previous.version == "1.0.0"
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: any(d.model and d.model.version == "2.0.0"
                         for d in collector.of(p.Decision, STATION)[before:]), 20,
             "2.0.0 deciding after promotion")
    ack = send(sender, collector, p.Rollback())
    assert ack.ok and ack.state_after and ack.state_after.active
    assert ack.state_after.active.version == "1.0.0"
    wait_for(lambda: latest_state(collector).active.version == "1.0.0",  # type: ignore[union-attr]
             10, "the retained state to show the rollback")


def test_a_tampered_bundle_is_refused_and_the_active_model_kept(
    running: tuple[Agent, Collector, MqttLink], bundle_server: tuple[str, Path]
) -> None:
    agent, collector, sender = running
    base, root = bundle_server
    body = deploy_body(base, root, "2.0.0")
    model = root / "part-classifier" / "2.0.0" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0xFF
    model.write_bytes(bytes(data))
    ack = send(sender, collector, body)
    assert not ack.ok and ack.error and "digest" in ack.error
    assert ack.state_after and ack.state_after.candidate is None
    assert ack.state_after.active and ack.state_after.active.version == "1.0.0"
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: len(collector.of(p.Decision, STATION)) > before + 3, 20, "more parts")


def test_an_older_candidate_is_refused(
    running: tuple[Agent, Collector, MqttLink], bundle_server: tuple[str, Path]
) -> None:
    agent, collector, sender = running
    base, root = bundle_server
    ack = send(sender, collector, deploy_body(base, root, "1.0.0"))
    assert not ack.ok and ack.error and "not newer" in ack.error


def test_a_malformed_command_gets_an_error_ack_and_the_agent_keeps_going(
    running: tuple[Agent, Collector, MqttLink],
) -> None:
    agent, collector, sender = running
    ack = send(sender, collector, p.Promote(), raw=b'{"schema": "linesight/v1", "body": 3}')
    assert not ack.ok and ack.command == "unknown" and ack.error
    ack = send(sender, collector, p.Promote(), raw=b"\xff\xfe not json")
    assert not ack.ok and "JSON" in (ack.error or "")
    # What Python's json module refuses with other errors than a JSON syntax error.
    huge_number = b'{"schema": "linesight/v1", "seq": ' + b"9" * 5000 + b"}"
    deep = b"[" * 100_000 + b"]" * 100_000
    for raw in (huge_number, deep):
        ack = send(sender, collector, p.Promote(), raw=raw)
        assert not ack.ok and "JSON" in (ack.error or ""), ack.error
    # An unknown key of 5,000 characters: the error names it, cut short, and is still acked.
    document = json.loads(command(STATION, p.Promote()).to_json())
    document["k" * 5000] = 1
    cmd_id = uuid.UUID(document["cmd_id"])
    ack = publish(sender, collector, json.dumps(document).encode(), cmd_id)
    assert not ack.ok and ack.error and "kkk" in ack.error and len(ack.error) < 1500
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: len(collector.of(p.Decision, STATION)) > before + 3, 20, "more parts")


def test_a_repeated_command_is_acked_but_not_redone(
    running: tuple[Agent, Collector, MqttLink], bundle_server: tuple[str, Path]
) -> None:
    agent, collector, sender = running
    base, root = bundle_server
    cmd_id = uuid.uuid4()
    first = send(sender, collector, deploy_body(base, root, "2.0.0"), cmd_id=cmd_id)
    assert first.ok
    promote_id = uuid.uuid4()
    assert send(sender, collector, p.Promote(), cmd_id=promote_id).ok
    again = p.Command(station=STATION, seq=2, cmd_id=promote_id, body=p.Promote())
    sender.publish(p.Topics().station(STATION, p.Channel.CMD), again.to_json(), qos=1)
    wait_for(lambda: len(collector.acks(promote_id)) >= 2, 20, "the repeated ack")
    repeated = collector.acks(promote_id)[-1]
    assert repeated.ok, "a repeated promote answers with the first result, it is not redone"
    assert repeated.state_after and repeated.state_after.active
    assert repeated.state_after.active.version == "2.0.0"
    assert repeated.state_after.previous and repeated.state_after.previous.version == "1.0.0"
    assert V2.exists()


def test_a_station_with_a_command_key_carries_out_only_signed_commands(
    tmp_path: Path, broker: Broker
) -> None:
    controller_key = Ed25519PrivateKey.generate()
    public = tmp_path / "command.pub"
    public.write_bytes(controller_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with station_running(tmp_path, broker, command_key=public) as (agent, collector, sender):
        def command(level: p.AutomationLevel, cmd_id: uuid.UUID | None = None) -> p.Command:
            return p.Command(station=STATION, seq=1, cmd_id=cmd_id or uuid.uuid4(),
                             body=p.SetAutomation(automation=level, reason="test"))

        # What cannot be authenticated is answered under the nil cmd_id, never under the one
        # it claims: an error ack under a real command's id would roll its rollout back.
        nil = uuid.UUID(int=0)
        unsigned = command(p.AutomationLevel.FULL)
        ack = publish(sender, collector, unsigned.to_json(), nil)
        assert not ack.ok and ack.error and "not signed" in ack.error
        assert str(unsigned.cmd_id) in ack.error
        foreign = sign_command(command(p.AutomationLevel.FULL), Ed25519PrivateKey.generate())
        ack = publish(sender, collector, foreign.to_json(), nil)
        assert not ack.ok and ack.error and "does not match" in ack.error
        # Signed for human_only, then edited on the way to say full.
        signed = sign_command(command(p.AutomationLevel.HUMAN_ONLY), controller_key)
        edited = signed.to_json().replace(b'"human_only"', b'"full"')
        ack = publish(sender, collector, edited, nil)
        assert not ack.ok and ack.error and "does not match" in ack.error
        # Unreadable, or addressed elsewhere, but claiming the genuine command's id.
        unreadable = json.dumps({"cmd_id": str(signed.cmd_id), "body": 3}).encode()
        ack = publish(sender, collector, unreadable, nil)
        assert not ack.ok and str(signed.cmd_id) in (ack.error or "")
        elsewhere = command(p.AutomationLevel.FULL, signed.cmd_id).model_copy(
            update={"station": "press-99"})
        ack = publish(sender, collector, elsewhere.to_json(), nil)
        assert not ack.ok and "not signed" in (ack.error or "")
        assert collector.acks(signed.cmd_id) == [], "a forgery answered for the real command"
        assert agent.automation == p.AutomationLevel.PARTIAL, "no refused command changed it"

        # A stale copy (expired) does not use up the cmd_id: the fresh copy is carried out.
        stale = sign_command(signed.model_copy(update={
            "signature": None, "expires_at": datetime.now(UTC) - timedelta(minutes=1)}),
            controller_key)
        ack = publish(sender, collector, stale.to_json(), signed.cmd_id)
        assert not ack.ok and "expired" in (ack.error or "")
        ack = publish(sender, collector, signed.to_json(), signed.cmd_id)
        assert ack.ok, ack.error
        assert ack.state_after and ack.state_after.automation == p.AutomationLevel.HUMAN_ONLY
        assert agent.automation == p.AutomationLevel.HUMAN_ONLY


class SlowFiles(QuietFiles):
    """Bundle files, each after a second: a deploy that is still downloading at a stop."""

    asked = threading.Event()

    def do_GET(self) -> None:
        SlowFiles.asked.set()
        time.sleep(1.0)
        super().do_GET()


def test_a_stop_finishes_the_command_in_hand_and_delivers_its_ack(
    tmp_path: Path, broker: Broker
) -> None:
    """The ack of a command still running at a stop (a deploy downloading its bundle) is among
    what the station delivers on its way out, not left in its outbox for the next start."""
    root = tmp_path / "served"
    shutil.copytree(MODELS, root)
    SlowFiles.asked.clear()
    with http_server(functools.partial(SlowFiles, directory=str(root))) as base:
        with station_running(tmp_path, broker) as (agent, collector, sender):
            body = deploy_body(base, root, "2.0.0")
            order = command(STATION, body)
            sender.publish(p.Topics().station(STATION, p.Channel.CMD), order.to_json(), qos=1)
            assert SlowFiles.asked.wait(20), "the deploy did not start its download"
            agent.stop()  # what SIGTERM does; station_running then waits for the agent
        acks = collector.acks(order.cmd_id)
    assert [ack.ok for ack in acks] == [True], [ack.error for ack in acks]
    assert acks[0].state_after and acks[0].state_after.candidate
    with StationStore(tmp_path / "station") as store:
        assert store.outbox_depth() == 0, "everything, the ack too, was delivered"
