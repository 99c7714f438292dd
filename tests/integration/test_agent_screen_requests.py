"""A supervisor's request from the station screen (another automation level) is never lost and
never made twice: it stays open in the store until the save of the slots that carries its change
takes it, in the same commit. A save the store refuses (a full disk, a locked database) leaves
the request open, so a station restarted before the save (a crash, a power cut, kill -9) makes
it again; requests are made in the order they were made on the screen, and the line inspects
throughout. Real agent and store (a SQLite trigger refuses the slots' write); the last test runs
the agent as its own process on a real broker and kills it."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from tests.integration.test_agent_unsaved_changes import (
    STATION,
    agent_process,
    refuse_slot_saves,
)
from tests.support import command, kill_agent, unstarted_agent, wait_for

FULL = p.AutomationLevel.FULL
PARTIAL = p.AutomationLevel.PARTIAL  # the configuration's level, on a first start
ASSIST = p.AutomationLevel.ASSIST


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def ask(data_dir: Path, level: str, reason: str = "stable for a week", by: str = "9001") -> int:
    """A supervisor's request, made on the screen (the UI's own store)."""
    with StationStore(data_dir) as screen:
        return screen.request_automation(level, reason, by)


def taken(data_dir: Path, request_id: int) -> bool:
    """Whether the store counts the request as taken (its change saved)."""
    with contextlib.closing(sqlite3.connect(data_dir / "station.db")) as conn:
        row = conn.execute("SELECT taken_us FROM ui_requests WHERE id = ?", (request_id,))
        found = row.fetchone()
    assert found is not None, f"request {request_id} is not in the store"
    return found[0] is not None


def saved_automation(data_dir: Path) -> str | None:
    with StationStore(data_dir) as store:
        saved = store.load_slots()
    return None if saved is None else saved.get("automation")


def test_a_request_whose_save_fails_is_made_again_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "s"
    with station(data) as agent:
        assert agent.automation == PARTIAL
        request = ask(data, "full")
        refuse_slot_saves(data / "station.db", True)
        agent._take_ui_requests()
        assert agent.automation == FULL, "the request is made at once, saved or not"
        assert "slots_save" in agent.faults
        assert not taken(data, request), "taken before its change was saved"
        # The station dies here (kill -9, a power cut): nothing saves the slots.
    refuse_slot_saves(data / "station.db", False)
    with station(data) as restarted:
        assert restarted.automation == PARTIAL, "the unsaved change is undone by the restart"
        restarted._take_ui_requests()
        assert restarted.automation == FULL, "the supervisor's request was lost"
        assert taken(data, request)
        assert "slots_save" not in restarted.faults
    with station(data) as after:
        assert after.automation == FULL, "a saved request outlives a restart"
        after._take_ui_requests()
        assert after.automation == FULL
    assert saved_automation(data) == FULL.value


def test_housekeeping_takes_a_request_with_the_save_that_finally_succeeds(tmp_path: Path) -> None:
    data = tmp_path / "s"
    with station(data) as agent:
        request = ask(data, "full")
        refuse_slot_saves(data / "station.db", True)
        agent._take_ui_requests()
        agent._persist_slots()  # housekeeping's retry, refused too
        assert not taken(data, request)
        fault = agent.faults.get("slots_save")
        assert fault is not None and "full" in fault.message and "9001" in fault.message, fault
        refuse_slot_saves(data / "station.db", False)
        agent._persist_slots()  # the retry the store takes
        assert taken(data, request)
        assert "slots_save" not in agent.faults
        assert saved_automation(data) == FULL.value


def test_a_request_waiting_for_its_save_is_not_made_again_over_a_later_change(
    tmp_path: Path,
) -> None:
    data = tmp_path / "s"
    with station(data) as agent:
        request = ask(data, "full")
        refuse_slot_saves(data / "station.db", True)
        agent._take_ui_requests()
        assert agent.automation == FULL
        # The controller sets another level afterwards; still unsaved, so unanswered.
        later = command(STATION, p.SetAutomation(automation=ASSIST, reason="gate"))
        assert agent.handle_command(later.to_json()) is None
        agent._take_ui_requests()  # housekeeping finds the request still open: in hand already
        assert agent.automation == ASSIST, "the screen's request was made a second time"
        refuse_slot_saves(data / "station.db", False)
        ack = agent.handle_command(later.to_json())
        assert ack is not None and ack.ok, ack
        assert taken(data, request), "the save that carries the later level takes it too"
    with station(data) as restarted:
        restarted._take_ui_requests()
        assert restarted.automation == ASSIST, "a taken request was made again after a restart"


def test_requests_are_made_in_the_order_asked_also_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "s"
    with station(data) as agent:
        first, second = ask(data, "full"), ask(data, "assist", "new batch", "9002")
        refuse_slot_saves(data / "station.db", True)
        agent._take_ui_requests()
        assert agent.automation == ASSIST
        # The station dies before any save.
    refuse_slot_saves(data / "station.db", False)
    with station(data) as restarted:
        assert restarted.automation == PARTIAL
        third = ask(data, "human_only", "camera moved", "9003")
        restarted._take_ui_requests()
        assert restarted.automation == p.AutomationLevel.HUMAN_ONLY
        assert restarted.automation_note == "human_only by 9003: camera moved"
        assert all(taken(data, request) for request in (first, second, third))
    assert saved_automation(data) == "human_only"
    with station(data) as again:
        assert again.automation == p.AutomationLevel.HUMAN_ONLY


def test_the_requests_a_restart_makes_again_are_made_in_the_order_asked(tmp_path: Path) -> None:
    data = tmp_path / "s"
    with station(data) as agent:
        ask(data, "full")
        ask(data, "assist", "new batch", "9002")
        refuse_slot_saves(data / "station.db", True)
        agent._take_ui_requests()
        # The station dies before any save.
    refuse_slot_saves(data / "station.db", False)
    with station(data) as restarted:
        restarted._take_ui_requests()
        assert restarted.automation == ASSIST, "the later request did not win"
        assert restarted.automation_note == "assist by 9002: new batch"
    assert saved_automation(data) == ASSIST.value


# --- the real thing: an agent process, a real broker, kill -9 ----------------------------------


def status(data_dir: Path, since: datetime | None = None) -> dict[str, Any]:
    """The agent's last status snapshot for the screen (empty: none written since `since`)."""
    with StationStore(data_dir) as store:
        loaded = store.load_status()
    if loaded is None or (since is not None and loaded[1] <= since):
        return {}
    return loaded[0]


def test_a_killed_station_makes_the_request_it_could_not_save_when_it_comes_back(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    first = agent_process(data, broker, log=log)
    try:
        wait_for(lambda: status(data).get("parts_inspected", 0) > 5, 60,
                 "the station to inspect")
        refuse_slot_saves(data / "station.db", True)
        request = ask(data, "full")
        wait_for(lambda: status(data).get("automation") == FULL.value, 60,
                 "the station to make the request")
        inspected = status(data)["parts_inspected"]
        wait_for(lambda: status(data).get("parts_inspected", 0) > inspected + 10, 60,
                 "the station to go on inspecting with the save refused")
        codes = [fault["code"] for fault in status(data).get("faults", [])]
        assert "slots_save" in codes, codes
    finally:
        kill_agent(first)
    assert not taken(data, request), "taken though its change was never saved"
    refuse_slot_saves(data / "station.db", False)
    restarted = datetime.now(UTC)
    second = agent_process(data, broker, log=log)
    try:
        wait_for(lambda: taken(data, request), 60, "the restarted station to take the request")
        assert saved_automation(data) == FULL.value, "the supervisor's request was lost"
        wait_for(lambda: status(data, restarted).get("automation") == FULL.value, 60,
                 "the restarted station to run at the level asked")
    finally:
        kill_agent(second)
    assert saved_automation(data) == FULL.value
