"""Changes at a part boundary: a command whose change the inspection loop cannot take in time
(a model stuck on a part) gets an error ack that says so, and the change is withdrawn, never
made later behind the controller's back. Real agent and bundles; no broker."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_agent.agent as agent_module
from edge_agent.agent import Agent
from edge_agent.inference import InferenceError, Prediction
from linesight import protocol as p
from tests.support import command, station_config, wait_for

STATION = "press-09"


class StuckSession:
    """A model whose first call hangs until released (a GPU driver that stopped answering)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, frame_bgr: np.ndarray) -> Prediction:
        self.entered.set()
        self.release.wait(30)
        raise InferenceError("stuck")


@contextlib.contextmanager
def running_station(data_dir: Path, **overrides: Any) -> Iterator[tuple[Agent, StuckSession]]:
    agent = Agent(station_config(data_dir, "mqtt://127.0.0.1:1", station=STATION,
                                 source="synthetic:seed=5,rate=50", automation="partial",
                                 outbox__relay="thread", outbox__receipt_wait_s=0.2,
                                 **overrides))
    stuck = StuckSession()
    agent.slots = dataclasses.replace(
        agent.slots, active=dataclasses.replace(agent.slots.active, session=stuck)
    )
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield agent, stuck
    finally:
        stuck.release.set()
        agent.stop()
        thread.join(30)
        assert not thread.is_alive(), "the agent did not stop"


def test_a_change_the_loop_cannot_take_in_time_is_refused_and_never_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "BOUNDARY_WAIT_S", 0.5)
    with running_station(tmp_path / "s") as (agent, stuck):
        assert stuck.entered.wait(20), "the loop never reached the model"
        body = p.SetAutomation(automation=p.AutomationLevel.FULL, reason="trial")
        sent = command(STATION, body)
        ack = agent.handle_command(sent.to_json())
        assert not ack.ok
        assert ack.error and "part boundary" in ack.error, ack.error

        stuck.release.set()  # the model answers at last, and the loop goes on
        inspected = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected > inspected + 3, 20, "the loop to go on")
        assert agent.automation == p.AutomationLevel.PARTIAL, "a refused change was made"
        again = agent.handle_command(sent.to_json())
        assert not again.ok and again.error == ack.error  # the same answer for the same cmd_id

        # With the loop moving, the same change goes through.
        ack = agent.handle_command(command(STATION, body).to_json())
        assert ack.ok, ack.error
        assert agent.automation == p.AutomationLevel.FULL


def test_a_change_queued_as_the_loop_ends_is_made_all_the_same(tmp_path: Path) -> None:
    agent = Agent(station_config(tmp_path / "s", "mqtt://127.0.0.1:1", station=STATION,
                                 outbox__relay="thread"))
    try:
        # The loop was running when the change was handed over, and ended before taking it.
        agent._loop_running = True
        threading.Timer(0.2, lambda: setattr(agent, "_loop_running", False)).start()
        assert agent.at_boundary(lambda: 42, timeout=10) == 42
    finally:
        agent.writer.close()
        agent.gate.close()
        agent.source.close()
        agent.store.close()


def test_a_screen_request_waits_for_the_loop_without_holding_up_housekeeping(
    tmp_path: Path,
) -> None:
    from edge_agent.store import StationStore

    with running_station(tmp_path / "s", state_interval_s=0.2) as (agent, stuck):
        assert stuck.entered.wait(20), "the loop never reached the model"
        with StationStore(tmp_path / "s") as screen:
            screen.request_automation("human_only", "new batch", "b1")
        asked = datetime.now(UTC)

        def refreshed_since_twice() -> bool:
            status = agent.store.load_status()
            return status is not None and status[1] > asked + timedelta(seconds=1.5)

        # Housekeeping took the request and goes on (the status snapshot is rewritten every
        # second) while the loop is stuck.
        wait_for(refreshed_since_twice, 10, "fresh status snapshots")
        assert agent.automation == p.AutomationLevel.PARTIAL
        stuck.release.set()
        wait_for(lambda: agent.automation == p.AutomationLevel.HUMAN_ONLY, 20,
                 "the request to be made once the loop goes on")
