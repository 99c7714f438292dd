"""deploy_candidate on a running station, over a real broker, from a bundle server that answers
wrongly: every refusal is an error ack naming its cause, the active model keeps deciding parts,
nothing is left staged; a good deploy sent twice under one cmd_id is downloaded once."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest

from edge_agent.agent import Agent
from linesight import protocol as p
from linesight.artifacts import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    load_private_key,
    sha256_bytes,
    sign_manifest,
)
from linesight.broker import Broker
from linesight.mqtt import MqttLink
from tests.integration.test_agent_commands import STATION, deploy_body, send, station_running
from tests.support import DEMO_KEY, V2, Collector, http_server, wait_for


class Scripted(BaseHTTPRequestHandler):
    """Serves the bundles under `root`; the first folder of the path says how to misbehave."""

    root: ClassVar[Path]
    elsewhere: ClassVar[str]
    asked: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        how, _, rest = self.path.strip("/").partition("/")
        name = rest.rpartition("/")[2]
        type(self).asked.append(f"{how}/{rest}")
        try:
            if how == "missing" and name == MODEL_FILE:
                self.send_error(404)
            elif how == "html" and name == MANIFEST_FILE:
                self._send(b"<!doctype html><html><body>Sign in</body></html>")
            elif how == "redirect" and name == MODEL_FILE:
                self.send_response(302)
                self.send_header("Location", f"{self.elsewhere}/{rest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif how == "trickle" and name == MODEL_FILE:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(600):  # a minute at most, so that a failing test still ends
                    self.wfile.flush()
                    time.sleep(0.1)
                    self.wfile.write(b"a")
            else:
                self._send((self.root / rest).read_bytes())
        except OSError:
            pass  # the station hung up

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def not_onnx_bundle(root: Path) -> None:
    """part-classifier 3.0.0, signed with the demo key like the shipped ones, whose model.onnx
    is a web page: digests and signature right, the model not a model."""
    folder = root / "part-classifier" / "3.0.0"
    folder.mkdir(parents=True)
    page = b"<!doctype html><html><body>not a model</body></html>"
    (folder / MODEL_FILE).write_bytes(page)
    manifest = json.loads((V2 / MANIFEST_FILE).read_bytes())
    manifest["version"] = "3.0.0"
    manifest["files"][MODEL_FILE] = {"sha256": sha256_bytes(page), "size": len(page)}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (folder / MANIFEST_FILE).write_bytes(data)
    (folder / SIGNATURE_FILE).write_text(sign_manifest(data, load_private_key(DEMO_KEY)))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, type[Scripted], Path]]:
    root = tmp_path / "served"
    shutil.copytree(V2, root / "part-classifier" / "2.0.0")
    not_onnx_bundle(root)
    handler = type("Served", (Scripted,), {"root": root, "asked": [], "elsewhere": ""})
    with http_server(handler) as elsewhere, http_server(handler) as base:
        handler.elsewhere = f"{elsewhere}/ok"
        yield base, handler, root


@pytest.fixture
def station(tmp_path: Path, broker: Broker) -> Iterator[tuple[Agent, Collector, MqttLink]]:
    with station_running(tmp_path, broker, download_timeout_s=1.0) as running:
        yield running


def assert_untouched(agent: Agent, ack: p.CommandAck) -> None:
    assert ack.state_after and ack.state_after.candidate is None
    assert ack.state_after.active and ack.state_after.active.version == "1.0.0"
    assert agent.slots.candidate is None and agent.slots.active.ref.version == "1.0.0"
    left = [path.name for path in agent.config.data_dir.iterdir()
            if path.name.startswith(".staging-")]
    assert left == [], "nothing half-staged"
    assert not list((agent.config.data_dir / "bundles").glob("*/*")), "no bundle kept"


@pytest.mark.parametrize(("how", "version", "cause"), [
    ("missing", "2.0.0", "HTTP Error 404"),
    ("html", "2.0.0", "the downloaded manifest differs from the command's sha256"),
    ("redirect", "2.0.0", "a redirect to http://127.0.0.1:"),
    ("trickle", "2.0.0", "not done within 1 s (download_timeout_s)"),
    ("ok", "3.0.0", "model.onnx is not a readable ONNX file"),
])
def test_a_bundle_that_cannot_be_taken_gets_an_error_ack_naming_the_cause(
    station: tuple[Agent, Collector, MqttLink], server: tuple[str, type[Scripted], Path],
    how: str, version: str, cause: str,
) -> None:
    agent, collector, sender = station
    base, handler, root = server
    ack = send(sender, collector, deploy_body(f"{base}/{how}", root, version))
    assert not ack.ok and ack.error and cause in ack.error, ack.error
    assert_untouched(agent, ack)
    if how == "redirect":
        assert not any(asked.startswith("ok/") for asked in handler.asked), "not followed"
    before = len(collector.of(p.Decision, STATION))
    wait_for(lambda: len(collector.of(p.Decision, STATION)) > before + 3, 20,
             "the active model to go on deciding parts")


def test_a_deploy_sent_twice_under_one_cmd_id_is_carried_out_once(
    station: tuple[Agent, Collector, MqttLink], server: tuple[str, type[Scripted], Path],
) -> None:
    agent, collector, sender = station
    base, handler, root = server
    body = deploy_body(f"{base}/ok", root, "2.0.0")
    cmd_id = uuid.uuid4()
    first = send(sender, collector, body, cmd_id=cmd_id)
    assert first.ok, first.error
    again = send(sender, collector, body, cmd_id=cmd_id)
    assert again.ok and again.state_after and again.state_after.candidate
    assert again.state_after.candidate.version == "2.0.0"
    assert handler.asked.count(f"ok/part-classifier/2.0.0/{MODEL_FILE}") == 1
    assert agent.slots.candidate and agent.slots.candidate.ref.version == "2.0.0"
