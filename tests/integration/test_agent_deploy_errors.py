"""deploy_candidate commands a running station must answer with an error ack, over a real broker:
a bundle server that cuts the transfer, and a canary without a fraction."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight import protocol as p
from linesight.artifacts import MODEL_FILE
from linesight.broker import Broker
from linesight.mqtt import MqttLink
from tests.integration.test_agent_commands import STATION, deploy_body, send, station_running
from tests.support import MODELS, Collector, http_server, wait_for


class BundleHandler(BaseHTTPRequestHandler):
    """The shipped bundles; under /cut/ every model.onnx transfer breaks off after a few bytes
    of its first chunk (a bundle server that crashed, a proxy that cut the connection)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        cut = self.path.startswith("/cut/")
        path = MODELS / self.path.removeprefix("/cut").lstrip("/")
        if cut and path.name == MODEL_FILE:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"10000\r\n" + path.read_bytes()[:100])
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def bundles() -> Iterator[str]:
    with http_server(BundleHandler) as base:
        yield base


@pytest.fixture
def station(tmp_path: Path, broker: Broker) -> Iterator[tuple[Agent, Collector, MqttLink]]:
    with station_running(tmp_path, broker) as running:
        yield running


def test_a_cut_bundle_transfer_gets_an_error_ack_and_the_station_keeps_going(
    station: tuple[Agent, Collector, MqttLink], bundles: str
) -> None:
    agent, collector, sender = station
    body = deploy_body(f"{bundles}/cut", MODELS, "2.0.0")
    cmd_id = uuid.uuid4()
    ack = send(sender, collector, body, cmd_id=cmd_id)
    assert not ack.ok and ack.error
    assert f"{bundles}/cut/part-classifier/2.0.0/{MODEL_FILE}" in ack.error
    assert "cut short" in ack.error
    assert ack.state_after and ack.state_after.candidate is None
    assert ack.state_after.active and ack.state_after.active.version == "1.0.0"
    # Recorded like any command: the same cmd_id is answered with the same error, not redone.
    again = send(sender, collector, body, cmd_id=cmd_id)
    assert not again.ok and again.error == ack.error
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: len(collector.of(p.Decision, STATION)) > before + 3, 20, "more parts")


def test_a_canary_deploy_without_a_fraction_gets_an_error_ack(
    station: tuple[Agent, Collector, MqttLink], bundles: str
) -> None:
    agent, collector, sender = station
    shadow = deploy_body(bundles, MODELS, "2.0.0")
    body = p.DeployCandidate(url=shadow.url, model=shadow.model, signature=shadow.signature,
                             mode=p.DeploymentMode.CANARY)
    assert body.canary_fraction == 0.0, "the protocol's default"
    ack = send(sender, collector, body)
    assert not ack.ok and ack.error and "canary needs a fraction" in ack.error
    assert ack.state_after and ack.state_after.candidate is None
    assert agent.slots.candidate is None
    assert not (agent.config.data_dir / "bundles").exists(), "refused before any download"
