"""What a slot change leaves behind: parts a rolled-back candidate had queued must not fault the
station or move the agreement of the models that run now, and a store that cannot save the
slots must not stop the inspection. Real agent, real bundles and onnxruntime; no broker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.slots import rolled_back, unloadable_model
from tests.support import V1, V2, unstarted_agent

STATION = "press-08"


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def test_a_rolled_back_candidates_queued_parts_leave_no_trace_on_the_station(
    tmp_path: Path,
) -> None:
    with station(tmp_path / "s", candidate=V2, mode="shadow") as agent:
        frame = agent.source.read(timeout=5)
        assert frame is not None
        agent.inspect(frame)
        queued = agent._jobs.get()  # the candidate's part, still waiting for the worker
        assert queued is not None
        # The candidate is rolled back (it kept timing out) before the worker gets to it.
        agent.at_boundary(lambda: agent._set_slots(rolled_back(agent.slots)))
        assert agent.slots.candidate is None
        timing_out = unloadable_model(V2, "inference took 900 ms, timeout 250 ms")
        agent._judge_with_other(dataclasses.replace(queued, other_model=timing_out))
        assert "candidate_inference" not in agent.faults, "a fault about a model gone"
        agent._publish_metrics()
        assert math.isnan(agent.metrics.registry.get_sample_value(
            "linesight_agreement_rate", {"station": STATION}) or 0.0)

        # The same failure from a model that still runs is a fault, as before.
        agent.at_boundary(lambda: agent._set_slots(agent.slots))  # a new generation
        current = dataclasses.replace(queued, other_model=timing_out,
                                      generation=agent._slot_generation)
        agent._judge_with_other(current)
        assert "candidate_inference" in agent.faults


def test_a_store_that_cannot_save_the_slots_does_not_stop_the_inspection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"source": "synthetic:seed=3,rate=100", "max_parts": 150, "drift_window": 50,
              "drift_sample_every": 1, "outbox__receipt_wait_s": 0.5}
    with station(tmp_path / "s", **config) as agent:
        save = agent.store.save_slots
        calls: list[int] = []

        def failing_save(record: dict[str, Any], command: Any = None,
                         requests: Any = ()) -> None:
            # The disk is full for the first 100 parts: at start, at every retry, and when the
            # drift reference is taken (part 50, on the inspection loop).
            calls.append(agent.parts_inspected)
            if agent.parts_inspected < 100:
                raise sqlite3.OperationalError("database or disk is full")
            save(record, command, requests)

        monkeypatch.setattr(agent.store, "save_slots", failing_save)
        assert agent.run() == 0
        assert agent.parts_inspected == 150
        assert 50 in calls, "the drift reference's save failed on the inspection loop"
        events = agent.metrics.registry.get_sample_value(
            "linesight_fault_events_total", {"station": STATION, "code": "slots_save"})
        assert events == 1
        assert "slots_save" not in agent.faults
    with station(tmp_path / "s") as restarted:
        record = restarted.store.load_slots()
        assert record is not None and record.get("drift_reference"), "saved once it could be"
        assert record["reference_for"] == restarted.slots.active.ref.sha256
        assert restarted.slots.active.ref.version == "1.0.0"
        assert V1.exists()


def _received(listener: socket.socket) -> list[str]:
    """Every datagram waiting on the socket (the run that sent them has returned)."""
    listener.setblocking(False)
    messages: list[str] = []
    while True:
        try:
            messages.append(listener.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_systemd_hears_at_ready_that_the_active_model_did_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY means inspecting; with the fail-safe placeholder in the active slot the unit's
    Status line says so, so `systemctl status` does not look healthy."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    try:
        for active, broken in ((tmp_path / "missing-bundle", True), (V1, False)):
            config = {"active": active, "max_parts": 3, "outbox__receipt_wait_s": 0.2}
            with station(tmp_path / f"s-{broken}", **config) as agent:
                assert agent.run() == 0
            [ready] = [m for m in _received(listener) if "READY=1" in m]
            assert ("ACTIVE MODEL NOT LOADED" in ready) is broken, ready
    finally:
        listener.close()


def test_a_store_from_before_seq_streams_reports_how_far_it_was_receipted(
    tmp_path: Path,
) -> None:
    """Without it, a controller that lost its store waits for seqs such a station deleted long
    ago, and the station's receipts stop for good."""
    data = tmp_path / "s"
    with station(data) as agent:
        agent.store.enqueue(agent._decision_topic, 1, lambda seq: _decision(agent, seq))
    raw = sqlite3.connect(data / "station.db")
    raw.execute("UPDATE outbox_meta SET stream = NULL")  # numbered before streams existed
    raw.commit()
    raw.close()
    with station(data) as legacy:
        assert legacy.store.stream is None
        state = legacy._state(online=True)
        assert state.stream is None and state.receipted_upto == -1


def _decision(agent: Agent, seq: int) -> Any:
    from linesight import protocol as p

    return p.Decision(
        station=agent.station, seq=seq, stream=agent.store.stream, part_id="P-1",
        decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
        model=agent.slots.active.ref, latency_ms=1.0, automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.NONE,
    )


def test_the_status_snapshot_names_the_running_models_labels(tmp_path: Path) -> None:
    with station(tmp_path / "s") as agent:
        agent._save_status()
        loaded = agent.store.load_status()
        assert loaded is not None
        manifest = agent.slots.active.manifest
        assert loaded[0]["model_labels"] == {
            "ok": manifest.ok_label, "defect": manifest.defect_label
        }
