"""A stage's evidence is what the controller received since the stage began, whatever the time
on the station's clock: results from before the stage, stamped by a clock that runs ahead, stay
out of its gate, and the stage's own results, stamped by a clock that runs behind, count.

The controller is built but never started (no broker, no threads), over the shipped 2.0.0
bundle; messages go in through `Controller.ingest` as they come off MQTT."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy import fleet_store
from deploy.controller import Controller
from deploy.fleet_store import SqliteFleetStore
from deploy.gates import PairedEvidence
from deploy.plan import parse_plan
from deploy.rollout import Phase, StageStep
from linesight import protocol as p
from linesight.mqtt import ReceivedMessage
from linesight.sqlite_db import SqliteDatabase
from tests.support import unstarted_controller
from tests.unit.test_fleet_store import CANDIDATE, T0, shadow, verdict

HOUR = timedelta(hours=1)
ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
PLAN = {
    "name": "shadow-then-promote",
    "stages": [
        {"name": "shadow", "stations": ["s1"], "mode": "shadow",
         "exit": {"min_parts": 300, "min_labelled_disagreements": 20, "max_duration_s": 3600},
         "gate": {"delta": 0.02, "escape_delta": 0.01, "min_labels": 15},
         "on_inconclusive": "rollback"},
        {"name": "promote", "stations": ["s1"], "mode": "promote"},
    ],
}


# --- the store: `since` is the controller's time of receipt ---------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFleetStore]:
    with SqliteFleetStore(tmp_path / "fleet.db") as opened:
        yield opened


def test_results_received_before_the_stage_stay_out_whatever_their_date(
    store: SqliteFleetStore,
) -> None:
    """A station whose clock runs an hour ahead: its results from before the stage began are
    dated after the stage's start."""
    store.ingest([
        shadow("a", 0, "p0", "ok", "defect", at=T0 + HOUR),
        shadow("a", 1, "p1", "ok", "ok", at=T0 + HOUR, latency_ms=80.0),
        verdict("a", 2, "p0", "ok", at=T0 + HOUR),
    ], received=T0 - timedelta(seconds=10))
    evidence = store.paired_evidence(["a"], T0, CANDIDATE.sha256)
    assert evidence.overall == PairedEvidence(0, 0, 0, 0)
    assert evidence.escapes == PairedEvidence(0, 0, 0, 0)
    assert evidence.p95_latency_ms is None


def test_results_received_since_the_stage_began_count_whatever_their_date(
    store: SqliteFleetStore,
) -> None:
    """A station whose clock runs an hour behind: its results from the stage are dated before
    the stage's start."""
    store.ingest([
        shadow("a", 0, "p0", "ok", "defect", at=T0 - HOUR),
        shadow("a", 1, "p1", "ok", "ok", at=T0 - HOUR, latency_ms=80.0),
        verdict("a", 2, "p0", "ok", at=T0 - HOUR),
    ], received=T0 + timedelta(seconds=10))
    evidence = store.paired_evidence(["a"], T0, CANDIDATE.sha256)
    assert evidence.overall == PairedEvidence(2, 1, 1, 0)
    assert evidence.p95_latency_ms == 80.0


def test_a_store_from_schema_6_dates_its_shadow_results_by_their_receipt(tmp_path: Path) -> None:
    """The migration gives each stored shadow result its message's time of receipt."""
    path = tmp_path / "fleet.db"
    old = SqliteDatabase(path, synchronous="NORMAL", busy_timeout_s=5.0)
    old.migrate(fleet_store._MIGRATIONS[:6])
    before, after = T0 - timedelta(seconds=10), T0 + timedelta(seconds=10)
    rows = [(1, 0, "p0", T0 + HOUR, before), (2, 1, "p1", T0 - HOUR, after)]
    with old.write() as conn:
        for row_id, seq, part_id, ts, received in rows:
            ts_us, received_us = (round(moment.timestamp() * 1e6) for moment in (ts, received))
            conn.execute(
                "INSERT INTO messages (id, station, seq, kind, msg_id, ts_us, payload, "
                "received_us) VALUES (?, 'a', ?, 'shadow', ?, ?, '{}', ?)",
                (row_id, seq, f"m{seq}", ts_us, received_us),
            )
            conn.execute(
                "INSERT INTO shadows (id, station, seq, part_id, ts_us, paired, agree, "
                "active_label, candidate_label, active_latency_ms, candidate_latency_ms, "
                "active_version, active_sha256, candidate_version, candidate_sha256) "
                "VALUES (?, 'a', ?, ?, ?, 1, 0, 'ok', 'defect', 3.0, 5.0, '1.0.0', ?, '1.1.0', ?)",
                (row_id, seq, part_id, ts_us, "a" * 64, CANDIDATE.sha256),
            )
    old.close()
    with SqliteFleetStore(path) as migrated:
        assert migrated.schema_version() == fleet_store.SCHEMA_VERSION
        evidence = migrated.paired_evidence(["a"], T0, CANDIDATE.sha256)
        assert evidence.overall == PairedEvidence(1, 1, 0, 0), "p1 alone: received after T0"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM shadows WHERE received_us IS NULL"
                            ).fetchone()[0] == 0


# --- the controller: a station whose clock is well ahead or behind ---------------------------


class Station:
    """Station s1 as the controller hears it, its clock `skew` off the controller's."""

    def __init__(self, skew: timedelta) -> None:
        self.skew = skew
        self.seqs = itertools.count()

    def deliver(self, controller: Controller, *messages: p.Envelope) -> None:
        topics = p.Topics(p.DEFAULT_PREFIX)
        controller.ingest([
            ReceivedMessage(topics.station(m.station, p.Channel(m.kind)), m.to_json(), 1, False)
            for m in messages
        ])

    def online(self, controller: Controller) -> None:
        self.deliver(controller, p.StationState(station="s1", seq=0, online=True))

    def ack_pending(self, controller: Controller) -> None:
        assert controller.rollout is not None
        self.deliver(controller, *(
            p.CommandAck(station="s1", seq=next(self.seqs), ts=self.clock(),
                         cmd_id=uuid.UUID(command.cmd_id), command=command.body["name"], ok=True)
            for command in controller.rollout.pending
        ))

    def clock(self) -> datetime:
        return datetime.now(UTC) + self.skew

    def candidate_lets_defects_pass(self, controller: Controller, candidate: p.ModelRef) -> None:
        """1,000 parts in shadow: 980 both models pass, 20 real defects the active model
        rejects and the candidate passes; the operators reject those 20."""
        now = self.clock()
        messages: list[p.Envelope] = []
        for i in range(1000):
            defect = i < 20
            active = "defect" if defect else "ok"
            messages.append(p.ShadowResult(
                station="s1", seq=next(self.seqs), ts=now, part_id=f"part-{i}",
                mode=p.DeploymentMode.SHADOW,
                active=p.ModelOpinion(model=ACTIVE, label=active, latency_ms=3.0),
                candidate=p.ModelOpinion(model=candidate, label="ok", latency_ms=3.0),
                agree=not defect,
            ))
            if defect:
                messages.append(p.Verdict(
                    station="s1", seq=next(self.seqs), ts=now, part_id=f"part-{i}",
                    operator="op", outcome=p.VerdictOutcome.REJECT, label="defect",
                    review_reason=p.ReviewReason.DISAGREEMENT, decided_at=now,
                ))
        self.deliver(controller, *messages)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    built = unstarted_controller(tmp_path)
    try:
        yield built
    finally:
        built.store.close()


def start_shadow(controller: Controller, station: Station) -> None:
    station.online(controller)
    controller.start_rollout(parse_plan(PLAN), "part-classifier", "2.0.0")
    controller.tick()  # s1 chosen, deploy_candidate sent


def test_results_from_before_the_stage_on_a_clock_ahead_do_not_fail_its_gate(
    controller: Controller,
) -> None:
    """s1's clock runs an hour ahead. Before this stage began it ran the candidate in shadow
    (an earlier rollout of it, stopped by hand), and those results let defects pass: dated an
    hour ahead, they must not count as this stage's evidence."""
    s1 = Station(HOUR)
    start_shadow(controller, s1)
    assert controller.rollout is not None
    s1.candidate_lets_defects_pass(controller, controller.rollout.candidate.model)
    s1.ack_pending(controller)
    assert controller.rollout.record.step == StageStep.OBSERVING
    controller.tick()
    state = controller.rollout
    assert state.phase == Phase.RUNNING, state.reason
    record = state.record
    assert record.observing_since is not None
    evidence = controller.store.paired_evidence(record.stations, record.observing_since,
                                                state.candidate.model.sha256)
    assert evidence.overall.parts == 0


def test_results_of_the_stage_on_a_clock_behind_fail_its_gate(controller: Controller) -> None:
    """s1's clock runs an hour behind: the stage's own results, dated before it began, are its
    evidence all the same."""
    s1 = Station(-HOUR)
    start_shadow(controller, s1)
    s1.ack_pending(controller)
    state = controller.rollout
    assert state is not None and state.record.step == StageStep.OBSERVING
    s1.candidate_lets_defects_pass(controller, state.candidate.model)
    controller.tick()
    state = controller.rollout
    assert state is not None and state.phase == Phase.ROLLING_BACK, state and state.history[-3:]
    assert state.reason.startswith("gate failed in 'shadow'"), state.reason
