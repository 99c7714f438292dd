"""A command's change that the store cannot save yet (a full disk, a locked database) is made at
once, but the command is acknowledged only once the change is saved: the controller is never
told that a change took effect which a restart (a crash, a power cut, kill -9) then undoes.
Real agent, real bundles and onnxruntime; the last test runs the agent as its own process on a
real broker and kills it."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, SIGNATURE_FILE, sha256_file
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import (
    DEMO_PUB,
    MODELS,
    V1,
    V2,
    Collector,
    command,
    file_server,
    kill_agent,
    station_config,
    unstarted_agent,
    wait_for,
)

STATION = "press-12"
DISK_FULL = "database or disk is full"

Running = tuple[str, str | None, str | None, str, str, str]
"""What a station runs: active, candidate and previous versions, mode, serving, automation."""


@pytest.fixture
def bundles() -> Iterator[str]:
    with file_server(MODELS) as base:
        yield base


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def running(agent: Agent) -> Running:
    slots = agent.slots
    return (
        slots.active.ref.version,
        slots.candidate.ref.version if slots.candidate else None,
        slots.previous.ref.version if slots.previous else None,
        slots.mode.value,
        slots.serving,
        agent.automation.value,
    )


def deploy(base: str, version: str) -> p.DeployCandidate:
    bundle = MODELS / "part-classifier" / version
    return p.DeployCandidate(
        url=f"{base}/part-classifier/{version}/",
        model=p.ModelRef(name="part-classifier", version=version,
                         sha256=sha256_file(bundle / MANIFEST_FILE)),
        signature=(bundle / SIGNATURE_FILE).read_text().strip(),
    )


class RefusedSaves:
    """The store refuses to save the model slots while `refusing` is set (its other writes,
    the command log's included, go through, as with a lock held on the slots' page)."""

    def __init__(self, store: StationStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.refusing = True
        self.refused = 0
        save = store.save_slots

        def save_slots(doc: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            if self.refusing:
                self.refused += 1
                raise sqlite3.OperationalError(DISK_FULL)
            save(doc, *args, **kwargs)

        monkeypatch.setattr(store, "save_slots", save_slots)


def acks_queued(store: StationStore, cmd_id: uuid.UUID) -> list[p.CommandAck]:
    """The acks for `cmd_id` in the outbox: what the controller is told, now or after a
    restart (nothing is receipted here, so nothing has left the outbox)."""
    acks = [
        p.parse(p.CommandAck, row.payload) for row in store.pending(limit=100_000)
        if row.topic.endswith("/ack")
    ]
    return [ack for ack in acks if ack.cmd_id == cmd_id]


# Each command, the station it is sent to (configuration overrides), and the body.
COMMANDS: dict[str, tuple[dict[str, Any], Callable[[str], p.CommandBody]]] = {
    "promote": ({"candidate": V2, "mode": "shadow"}, lambda _base: p.Promote()),
    "rollback": ({"candidate": V2, "mode": "shadow"}, lambda _base: p.Rollback(reason="gate")),
    "switch": ({"candidate": V2, "mode": "blue_green"},
               lambda _base: p.Switch(to="candidate")),
    "set_mode": ({"candidate": V2, "mode": "shadow"},
                 lambda _base: p.SetMode(mode=p.DeploymentMode.CANARY, canary_fraction=0.5)),
    "set_automation": ({}, lambda _base: p.SetAutomation(
        automation=p.AutomationLevel.FULL, reason="trial")),
    "deploy_candidate": ({}, lambda base: deploy(base, "2.0.0")),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_change_the_store_cannot_save_is_not_acked_and_a_restart_before_the_save_is_told_true(
    name: str, tmp_path: Path, bundles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, body = COMMANDS[name]
    data = tmp_path / "s"
    sent = command(STATION, body(bundles))
    with station(data, **overrides) as agent:
        before = running(agent)
        RefusedSaves(agent.store, monkeypatch)
        ack = agent.handle_command(sent.to_json())
        changed = running(agent)
        assert changed != before, "the change is made at once, saved or not"
        assert ack is None, f"acked before its change was saved: {ack}"
        assert acks_queued(agent.store, sent.cmd_id) == [], "an ack waits in the outbox"
        fault = agent.faults.get("slots_save")
        assert fault is not None and name in fault.message, fault
        # The station dies here (kill -9, a power cut): nothing saves the slots.
    with station(data, **overrides) as restarted:
        assert acks_queued(restarted.store, sent.cmd_id) == [], "told of a change now undone"
        assert running(restarted) == before, "the unsaved change is undone by the restart"
        # The controller sends the command again (it had no ack): carried out, saved, acked.
        again = restarted.handle_command(sent.to_json())
        assert again is not None and again.ok, again
        assert running(restarted) == changed
        assert again.state_after is not None
    with station(data, **overrides) as after:
        assert running(after) == changed, "an acked change outlives a restart"


def test_a_copy_sent_while_the_save_still_fails_is_not_carried_out_again(
    tmp_path: Path, bundles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback carried out twice would also undo the promotion before it."""
    with station(tmp_path / "s", candidate=V2, mode="shadow") as agent:
        promote = agent.handle_command(command(STATION, p.Promote()).to_json())
        assert promote is not None and promote.ok
        trial = agent.handle_command(command(STATION, deploy(bundles, "2.1.0")).to_json())
        assert trial is not None and trial.ok
        saves = RefusedSaves(agent.store, monkeypatch)
        rollback = command(STATION, p.Rollback(reason="gate failed"))
        assert agent.handle_command(rollback.to_json()) is None
        assert running(agent)[:3] == ("2.0.0", None, "1.0.0"), "the candidate is dropped at once"
        refused = saves.refused
        assert agent.handle_command(rollback.to_json()) is None, "still not saved"
        assert saves.refused > refused, "a copy tries the save again"
        assert running(agent)[:3] == ("2.0.0", None, "1.0.0"), "the promotion before was undone"
        saves.refusing = False
        again = agent.handle_command(rollback.to_json())
        assert again is not None and again.ok, again
        assert running(agent)[:3] == ("2.0.0", None, "1.0.0")
        assert "slots_save" not in agent.faults
        assert [a.ok for a in acks_queued(agent.store, rollback.cmd_id)] == [True]
        assert json.loads(agent.store.command_result(str(rollback.cmd_id)) or "{}")["ok"]


def test_housekeeping_acks_a_change_as_soon_as_the_store_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller need not wait for its next copy: the retry that saves the change acks
    the commands it made durable. The line inspects throughout."""
    config = station_config(tmp_path / "s", "mqtt://127.0.0.1:1", station=STATION,
                            source="synthetic:seed=3,rate=50", candidate=V2, mode="shadow",
                            outbox__relay="thread", outbox__receipt_wait_s=0.5)
    agent = Agent(config)
    saves = RefusedSaves(agent.store, monkeypatch)
    exits: list[int] = []
    thread = threading.Thread(target=lambda: exits.append(agent.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.parts_inspected > 5, 30, "the station to inspect")
        promote = command(STATION, p.Promote())
        assert agent.handle_command(promote.to_json()) is None
        assert agent.slots.active.ref.version == "2.0.0"
        inspected = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected > inspected + 10, 30,
                 "the station to go on inspecting with the save refused")
        assert acks_queued(agent.store, promote.cmd_id) == []
        saves.refusing = False
        wait_for(lambda: acks_queued(agent.store, promote.cmd_id) != [], 30,
                 "housekeeping to save the change and ack the promote")
        [ack] = acks_queued(agent.store, promote.cmd_id)
        assert ack.ok and active_version(ack.state_after) == "2.0.0", ack
        wait_for(lambda: "slots_save" not in agent.faults, 30, "the slots_save fault to clear")
    finally:
        agent.stop()
        thread.join(60)
    assert not thread.is_alive() and exits == [0]
    with StationStore(tmp_path / "s") as store:
        saved = store.load_slots()
        assert saved is not None and saved["active"] == str(V2)


# --- the real thing: an agent process, a real broker, kill -9 ----------------------------------


def agent_process(data_dir: Path, broker: Broker, *extra: str, log: Path
                  ) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable, "-m", "linesight.cli", "agent", "--station", STATION,
                "--broker", broker.url, "--source", "synthetic:seed=9,rate=40",
                "--active", str(V1), "--data-dir", str(data_dir), "--key", str(DEMO_PUB),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )


def refuse_slot_saves(db: Path, refuse: bool) -> None:
    """Make the station's own SQLite file refuse (or take again) every write of the model
    slots, from outside the agent, as a full disk or a failing one would."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        for event in ("INSERT", "UPDATE"):
            conn.execute(f"DROP TRIGGER IF EXISTS refuse_slots_{event.lower()}")
            if refuse:
                conn.execute(
                    f"CREATE TRIGGER refuse_slots_{event.lower()} BEFORE {event} ON documents "
                    f"WHEN NEW.name = 'slots' BEGIN SELECT RAISE(ABORT, '{DISK_FULL}'); END"
                )
        conn.commit()
    finally:
        conn.close()


def active_version(state: p.StationState | None) -> str | None:
    return state.active.version if state is not None and state.active is not None else None


def online_states(collector: Collector, since: int = 0) -> list[p.StationState]:
    states = collector.of(p.StationState, STATION)[since:]
    return [state for state in states if state.online]




def test_a_killed_station_never_contradicts_what_the_controller_was_told(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    collector = Collector(broker.url)
    sender = MqttLink(LinkConfig(url=broker.url, client_id="test-controller"))
    sender.start()
    assert sender.wait_connected(10)
    topic = p.Topics().station(STATION, p.Channel.CMD)
    promote = command(STATION, p.Promote())
    first = agent_process(data, broker, "--candidate", str(V2), "--mode", "shadow", log=log)
    try:
        try:
            wait_for(lambda: any(s.candidate and s.candidate.version == "2.0.0"
                                 for s in online_states(collector)), 60,
                     "the station online with 2.0.0 on trial")
            refuse_slot_saves(data / "station.db", True)
            sender.publish(topic, promote.to_json(), qos=1)
            # Commands are carried out in order: once the next one is answered, the promote
            # has been handled, and its ack (if any) is in the outbox before this one's.
            marker = command(STATION, p.Switch(to="candidate"))  # refused: not blue_green
            sender.publish(topic, marker.to_json(), qos=1)
            wait_for(lambda: collector.acks(marker.cmd_id) != [], 60, "the marker's ack")
            wait_for(lambda: any(active_version(s) == "2.0.0" for s in online_states(collector)),
                     60, "the station to run the promoted model")
        finally:
            kill_agent(first)
        with StationStore(data) as store:
            told = [ack.ok for ack in acks_queued(store, promote.cmd_id)]
        told += [ack.ok for ack in collector.acks(promote.cmd_id)]
        refuse_slot_saves(data / "station.db", False)
        seen = len(collector.of(p.StationState, STATION))
        second = agent_process(data, broker, log=log)
        try:
            wait_for(lambda: online_states(collector, seen) != [], 60, "the restarted station")
            restarted = online_states(collector, seen)[0]
            runs = active_version(restarted)
            assert not (any(told) and runs != "2.0.0"), (
                f"the controller was told the promote took effect ({told}), yet the restarted "
                f"station runs {runs}"
            )
            assert not any(told), f"acked before the change was saved: {told}"
            assert runs == "1.0.0" and restarted.candidate is not None
            # The controller sends the promote again, as it does until it is acked.
            sender.publish(topic, promote.to_json(), qos=1)
            wait_for(lambda: any(a.ok for a in collector.acks(promote.cmd_id)), 60,
                     "the promote's ack")
        finally:
            kill_agent(second)
        with StationStore(data) as store:
            saved = store.load_slots()
        assert saved is not None and saved["active"] == str(V2), "an acked promote was lost"
    finally:
        sender.stop()
        collector.close()
