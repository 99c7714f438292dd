"""The fleet controller with real agents, real models, a real mosquitto and simulated operators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.client import ControllerClient, ControllerUnavailable
from deploy.controller import Controller
from linesight import protocol as p
from linesight.artifacts import generate_keypair, load_public_key
from linesight.broker import Broker, free_port
from linesight.command_auth import signature_error
from tests.support import (
    DEMO_PUB,
    MODELS,
    AgentLine,
    Collector,
    served_controller,
    wait_for,
)

STATIONS = ("st-1", "st-2", "st-3")
COMMAND_KEY, COMMAND_PUB = "keys/command.key", "keys/command.pub"
PLAN = """
name: test-plan
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: shadow on st-1
    stations: [st-1]
    mode: shadow
    exit: {min_parts: 150, min_labelled_disagreements: 10, max_duration_s: 240}
    gate: {min_labels: 10}
    on_inconclusive: rollback
  - name: canary on st-1
    stations: [st-1]
    mode: canary
    fraction: 0.3
    exit: {min_parts: 60, min_labelled_disagreements: 5, max_duration_s: 240}
    gate: {min_labels: 5}
    on_inconclusive: rollback
  - name: promote everywhere
    stations: all
    mode: promote
"""


@pytest.fixture
def line(tmp_path: Path, broker: Broker) -> Iterator[AgentLine]:
    """Three stations that accept only commands signed with the controller's command key."""
    generate_keypair(tmp_path / COMMAND_KEY, tmp_path / COMMAND_PUB)
    running = AgentLine(broker.url, tmp_path, STATIONS, command_key=tmp_path / COMMAND_PUB)
    yield running
    running.stop()


@pytest.fixture
def controller(line: AgentLine) -> Iterator[tuple[Controller, ControllerClient]]:
    with served_controller(
        line.root, line.broker_url, command_key=line.root / COMMAND_KEY
    ) as served:
        yield served


def finished(client: ControllerClient) -> bool:
    doc = client.current()
    return doc is not None and doc["phase"] in ("promoted", "rolled_back", "aborted")


def test_a_better_model_is_promoted_on_every_station(
    line: AgentLine, controller: tuple[Controller, ControllerClient]
) -> None:
    ctl, client = controller
    collector = Collector(line.broker_url)
    line.start()
    wait_for(lambda: len(ctl.fleet()) == 3 and all(v.online for v in ctl.fleet().values()),
             30, "three stations online")
    client.start_rollout(PLAN, "part-classifier", "2.0.0")
    wait_for(lambda: finished(client), 240, "the rollout to end")
    doc = client.current()
    assert doc is not None and doc["phase"] == "promoted", doc
    assert [s["status"] for s in doc["stages"]] == ["passed", "passed", "passed"]
    wait_for(lambda: all(a.slots.active.ref.version == "2.0.0" for a in line.agents.values()),
             20, "2.0.0 active everywhere")
    # The collector hears the commands beside the stations, not before them: its copy of the
    # last promote may still be on its way when the stations have carried it out.
    wait_for(lambda: all("promote" in {c.body.name for c in collector.of(p.Command, station)}
                         for station in STATIONS), 10, "the collector to hear every promote")
    # Stations of a later wave were never touched before the earlier waves passed.
    canary = [c.ts for c in collector.of(p.Command, "st-1") if c.body.name == "set_mode"]
    later = [c.ts for c in collector.of(p.Command) if c.station != "st-1"]
    assert canary and later and min(later) > max(canary)
    assert {c.body.name for c in collector.of(p.Command, "st-2")} == {"deploy_candidate",
                                                                      "promote"}
    candidate_decided = [d for d in collector.of(p.Decision, "st-1")
                         if d.decided_by == "candidate"]
    assert candidate_decided, "the canary stage let the candidate decide some parts"
    # Every command went out signed, and every station (which refuses unsigned ones) obeyed.
    public = load_public_key(line.root / COMMAND_PUB)
    assert all(signature_error(c, public) is None for c in collector.of(p.Command))
    assert all(c.expires_at is not None and c.expires_at > c.ts for c in collector.of(p.Command))
    assert all(a.ok for a in collector.of(p.CommandAck)), "no command was refused"
    collector.close()


def test_a_regressed_model_is_rolled_back_before_it_decides_a_part(
    line: AgentLine, controller: tuple[Controller, ControllerClient]
) -> None:
    ctl, client = controller
    collector = Collector(line.broker_url)
    line.start()
    wait_for(lambda: len(ctl.fleet()) == 3, 30, "three stations")
    client.start_rollout(PLAN, "part-classifier", "2.1.0")
    wait_for(lambda: finished(client), 300, "the rollout to end")
    doc = client.current()
    assert doc is not None and doc["phase"] == "rolled_back", doc
    assert "gate failed" in doc["reason"] and doc["stages"][0]["status"] == "failed"
    assert doc["touched"] == ["st-1"]
    wait_for(lambda: line.agents["st-1"].slots.candidate is None, 20, "st-1 rolled back")
    assert all(a.slots.active.ref.version == "1.0.0" for a in line.agents.values())
    assert not [d for d in collector.of(p.Decision) if d.decided_by == "candidate"]
    collector.close()


UNSIGNED_PLAN = """
name: promote at once
promote_without_evidence: true
command_timeout_s: 4
command_retry_s: 1
stages:
  - name: promote st-1
    stations: [st-1]
    mode: promote
"""


def test_a_controller_that_does_not_sign_is_told_why_its_commands_go_unanswered(
    line: AgentLine,
) -> None:
    """Stations that take only signed commands refuse this controller's under the nil cmd_id:
    that fails nothing by itself, but the rollout's history and its reason say why."""
    with served_controller(line.root, line.broker_url) as (ctl, client):  # no command key
        line.start()
        wait_for(lambda: len(ctl.fleet()) == 3, 30, "three stations")
        client.start_rollout(UNSIGNED_PLAN, "part-classifier", "2.0.0")
        wait_for(lambda: finished(client), 60, "the rollout to end")
        doc = client.current()
    assert doc is not None and doc["phase"] == "rolled_back", doc
    refused = ("refused a command it could not authenticate: command is not signed; this "
               "station accepts only signed commands")
    assert doc["reason"].startswith("no ack in 4 s for deploy_candidate to st-1 (it " + refused)
    assert any(f"st-1 {refused}" in entry for entry in doc["history"]), doc["history"]
    assert all(a.slots.candidate is None for a in line.agents.values())
    assert all(a.slots.active.ref.version == "1.0.0" for a in line.agents.values())


def test_the_cli_says_when_no_controller_runs() -> None:
    client = ControllerClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ControllerUnavailable, match="no controller is running"):
        client.current()
    result = subprocess.run(
        [sys.executable, "-m", "linesight.cli", "fleet", "rollout", "status",
         "--controller", client.url], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "no controller is running" in result.stderr


def serve_process(root: Path, broker: Broker, port: int) -> subprocess.Popen[bytes]:
    with (root / "controller.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "fleet", "serve", "--broker", broker.url,
             "--data-dir", str(root / "fleet"), "--bundles", str(MODELS), "--key",
             str(DEMO_PUB), "--command-key", str(root / COMMAND_KEY), "--http-port", str(port)],
            stdout=log, stderr=log,
        )


def test_a_killed_controller_resumes_its_rollout(
    line: AgentLine, tmp_path: Path, broker: Broker
) -> None:
    port = free_port()
    client = ControllerClient(f"http://127.0.0.1:{port}")
    first = serve_process(tmp_path, broker, port)
    try:
        wait_for(lambda: _answers(client), 30, "the controller's API")
        line.start()
        wait_for(lambda: len(client.get("/api/stations")["stations"]) == 3, 30, "stations")
        started = client.start_rollout(PLAN, "part-classifier", "2.0.0")
        wait_for(lambda: (client.current() or {}).get("stage", 0) >= 1, 240, "stage 2")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    second = serve_process(tmp_path, broker, port)
    try:
        wait_for(lambda: _answers(client), 30, "the restarted controller")
        doc = client.current()
        assert doc is not None and doc["rollout_id"] == started["rollout_id"]
        wait_for(lambda: finished(client), 240, "the resumed rollout to end")
        doc = client.current()
        assert doc is not None and doc["phase"] == "promoted", doc
        wait_for(lambda: all(a.slots.active.ref.version == "2.0.0"
                             for a in line.agents.values()), 30, "2.0.0 everywhere")
        history = "\n".join(doc["history"])
        assert history.count("promoted") >= 1
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def _answers(client: ControllerClient) -> bool:
    try:
        client.get("/api/health")
        return True
    except ControllerUnavailable:
        return False
