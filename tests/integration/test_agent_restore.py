"""What a station ran survives a restart: its saved slots are restored slot by slot, so a bundle
gone from disk costs only its own slot, and the automation level is kept whatever the models do.
Real bundles, served over HTTP and loaded with onnxruntime; the stations are not connected."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, SIGNATURE_FILE, sha256_file
from tests.support import MODELS, V1, command, file_server, unstarted_agent

STATION = "press-09"



@pytest.fixture
def bundles() -> Iterator[str]:
    with file_server(MODELS) as base:
        yield base


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def order(agent: Agent, body: p.CommandBody) -> p.CommandAck:
    ack = agent.handle_command(command(STATION, body).to_json())
    assert ack.ok, ack.error
    return ack


def deploy(base: str, version: str, mode: p.DeploymentMode = p.DeploymentMode.SHADOW,
           fraction: float = 0.0) -> p.DeployCandidate:
    bundle = MODELS / "part-classifier" / version
    return p.DeployCandidate(
        url=f"{base}/part-classifier/{version}/",
        model=p.ModelRef(name="part-classifier", version=version,
                         sha256=sha256_file(bundle / MANIFEST_FILE)),
        signature=(bundle / SIGNATURE_FILE).read_text().strip(),
        mode=mode, canary_fraction=fraction,
    )


def versions(agent: Agent) -> tuple[str, str | None, str | None]:
    slots = agent.slots
    return (
        slots.active.ref.version,
        slots.candidate.ref.version if slots.candidate else None,
        slots.previous.ref.version if slots.previous else None,
    )


def test_a_promotion_over_an_unloadable_model_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "station"
    setup = {"active": tmp_path / "missing-bundle", "candidate": V1, "mode": "shadow"}
    with station(data, **setup) as agent:
        assert agent.slots.active.ref.name == "unloaded"
        assert "active_load" in agent.faults
        ack = order(agent, p.Promote())
        assert ack.state_after and ack.state_after.previous is None, "no placeholder to go back to"
        assert "active_load" not in agent.faults, "a loaded model replaced the placeholder"
        assert not any(f.code == "active_load" for f in ack.state_after.faults)
    with station(data, **setup) as agent:
        assert (agent.slots.active.ref.name, versions(agent)) == ("part-classifier",
                                                                  ("1.0.0", None, None))
        assert "active_load" not in agent.faults


def test_a_lost_previous_bundle_keeps_active_candidate_mode_and_automation(
    tmp_path: Path, bundles: str
) -> None:
    data = tmp_path / "station"
    first = tmp_path / "installed" / "1.0.0"
    shutil.copytree(V1, first)
    with station(data, active=first, automation="partial") as agent:
        order(agent, deploy(bundles, "2.0.0"))
        order(agent, p.Promote())
        order(agent, deploy(bundles, "2.1.0", p.DeploymentMode.CANARY, 0.2))
        order(agent, p.SetAutomation(automation=p.AutomationLevel.FULL, reason="validated"))
        assert versions(agent) == ("2.0.0", "2.1.0", "1.0.0")
    shutil.rmtree(first)  # the model kept for rollback is gone from disk
    with station(data, active=first, automation="partial") as agent:
        assert versions(agent) == ("2.0.0", "2.1.0", None)
        assert (agent.slots.mode, agent.slots.canary_fraction) == (p.DeploymentMode.CANARY, 0.2)
        assert agent.automation == p.AutomationLevel.FULL


def test_a_lost_active_bundle_falls_back_to_the_configured_model_and_keeps_the_automation(
    tmp_path: Path, bundles: str
) -> None:
    data = tmp_path / "station"
    with station(data, automation="partial") as agent:
        order(agent, deploy(bundles, "2.0.0"))
        order(agent, p.Promote())
        order(agent, p.SetAutomation(automation=p.AutomationLevel.FULL, reason="validated"))
        promoted_bundle = agent.slots.active.bundle
    shutil.rmtree(promoted_bundle)
    with station(data, automation="partial") as agent:
        assert versions(agent) == ("1.0.0", None, None), "the configured model, not a placeholder"
        assert agent.automation == p.AutomationLevel.FULL


def test_a_saved_canary_without_a_fraction_comes_back_in_shadow(
    tmp_path: Path, bundles: str
) -> None:
    data = tmp_path / "station"
    with station(data) as agent:
        order(agent, deploy(bundles, "2.0.0"))
        order(agent, p.Promote())
        order(agent, deploy(bundles, "2.1.0"))
        # What a station saved when a deploy {mode: canary} without a fraction was accepted.
        record = agent.store.load_slots()
        assert record is not None
        record.update(mode="canary", canary_fraction=0.0)
        agent.store.save_slots(record)
    with station(data) as agent:
        assert versions(agent) == ("2.0.0", "2.1.0", "1.0.0"), "the promotion is not undone"
        assert agent.slots.mode == p.DeploymentMode.SHADOW
