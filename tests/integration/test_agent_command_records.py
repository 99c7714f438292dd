"""A command carried out once is never carried out again for the same cmd_id, even when its
result could not be written to the store (a full disk, a lock held too long): the controller
sends a command again until it is acked, and a rollback done twice undoes the promotion before
it. A change is recorded with its command in the slots' commit, and acked only after it (see
test_agent_unsaved_changes.py). Real agent and bundles; no broker."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.relay import RelayProcess
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, SIGNATURE_FILE, sha256_file
from tests.support import (
    MODELS,
    V2,
    command,
    file_server,
    station_config,
    unstarted_agent,
    wait_for,
)

STATION = "press-11"


@pytest.fixture
def bundles() -> Iterator[str]:
    with file_server(MODELS) as base:
        yield base


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def deploy(base: str, version: str) -> p.DeployCandidate:
    bundle = MODELS / "part-classifier" / version
    return p.DeployCandidate(
        url=f"{base}/part-classifier/{version}/",
        model=p.ModelRef(name="part-classifier", version=version,
                         sha256=sha256_file(bundle / MANIFEST_FILE)),
        signature=(bundle / SIGNATURE_FILE).read_text().strip(),
    )


def ok(agent: Agent, body: p.CommandBody) -> bool:
    ack = agent.handle_command(command(STATION, body).to_json())
    return ack is not None and ack.ok


def versions(agent: Agent) -> tuple[str, str | None, str | None]:
    slots = agent.slots
    return (
        slots.active.ref.version,
        slots.candidate.ref.version if slots.candidate else None,
        slots.previous.ref.version if slots.previous else None,
    )


def fails_once(monkeypatch: pytest.MonkeyPatch, store: StationStore, method: str) -> None:
    """The store's `method` (save_slots, record_command) fails the first time it is called."""
    real = getattr(store, method)
    calls = {"n": 0}

    def once(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(*args, **kwargs)

    monkeypatch.setattr(store, method, once)


def test_a_rollback_whose_result_was_not_stored_is_not_done_again(
    tmp_path: Path, bundles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with station(tmp_path / "s", candidate=V2, mode="shadow") as agent:
        assert ok(agent, p.Promote())
        assert ok(agent, deploy(bundles, "2.1.0"))
        assert versions(agent) == ("2.0.0", "2.1.0", "1.0.0")
        fails_once(monkeypatch, agent.store, "save_slots")
        rollback = command(STATION, p.Rollback(reason="gate failed")).to_json()
        assert agent.handle_command(rollback) is None, "acked before its change was saved"
        assert versions(agent) == ("2.0.0", None, "1.0.0"), "the candidate is dropped"
        again = agent.handle_command(rollback)  # the controller sends it again: no ack came
        assert again is not None and again.ok, again
        assert versions(agent) == ("2.0.0", None, "1.0.0"), "the promotion before was undone"
        assert again.state_after and again.state_after.active
        assert again.state_after.active.version == "2.0.0"


def test_a_promote_whose_result_was_not_stored_is_acked_ok_when_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with station(tmp_path / "s", candidate=V2, mode="shadow") as agent:
        fails_once(monkeypatch, agent.store, "save_slots")
        promote = command(STATION, p.Promote()).to_json()
        assert agent.handle_command(promote) is None, "acked before its change was saved"
        assert versions(agent) == ("2.0.0", None, "1.0.0")
        again = agent.handle_command(promote)
        assert again is not None and again.ok, again
        assert versions(agent) == ("2.0.0", None, "1.0.0")


def test_a_refusal_whose_record_was_not_stored_is_given_again_for_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with station(tmp_path / "s", candidate=V2, mode="shadow") as agent:
        fails_once(monkeypatch, agent.store, "record_command")
        switch = command(STATION, p.Switch(to="candidate")).to_json()
        refused = agent.handle_command(switch)
        assert refused is not None and not refused.ok and refused.error
        again = agent.handle_command(switch)
        assert again is not None and not again.ok and again.error == refused.error
        assert versions(agent) == ("1.0.0", "2.0.0", None)


def test_a_rollback_cut_short_before_its_ack_is_not_done_again_after_a_restart(
    tmp_path: Path, bundles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "s"
    rollback = command(STATION, p.Rollback(reason="gate failed")).to_json()
    with station(data, candidate=V2, mode="shadow") as agent:
        assert ok(agent, p.Promote())
        assert ok(agent, deploy(bundles, "2.1.0"))

        def power_cut(*args: Any, **kwargs: Any) -> None:  # the station dies right here
            raise SystemExit("power cut")

        # The change and its record are saved in one commit; the ack is queued after it.
        monkeypatch.setattr(agent.store, "enqueue", power_cut)
        with contextlib.suppress(SystemExit):
            agent.handle_command(rollback)
    with station(data, candidate=V2, mode="shadow") as agent:
        assert versions(agent) == ("2.0.0", None, "1.0.0"), "the rollback's change was saved"
        again = agent.handle_command(rollback)
        assert again is not None and again.ok, again
        assert versions(agent) == ("2.0.0", None, "1.0.0"), "the promotion before was undone"


def test_a_verdict_the_disk_cannot_take_does_not_stop_the_rest_of_housekeeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = station_config(tmp_path / "s", "mqtt://127.0.0.1:1", station=STATION,
                            source="synthetic:seed=3,rate=50")
    agent = Agent(config)

    def disk_full(*args: Any, **kwargs: Any) -> list[p.Envelope]:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(agent.store, "publish_verdicts", disk_full)
    exits: list[int] = []
    thread = threading.Thread(target=lambda: exits.append(agent.run()), daemon=True)
    thread.start()
    try:
        assert isinstance(agent.relay, RelayProcess)
        wait_for(lambda: agent.relay.alive(), 20, "the outbox relay to start")
        pid = agent.relay.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: agent.relay.starts >= 2 and agent.relay.alive(), 20,
                 "the dead relay to be started again")
        assert "outbox_relay" in agent.faults
    finally:
        agent.stop()
        thread.join(30)
    assert not thread.is_alive(), "the agent did not stop"
    assert exits == [0], "the stop did not run to its end"
