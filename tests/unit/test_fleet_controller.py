"""The fleet controller on a real SQLite store and real signed bundles, built but never started:
no broker, no threads. Messages go in through `Controller.ingest` as they come off MQTT; what the
controller publishes waits in the MQTT client's memory and is dropped with it."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.config import ControllerConfig
from deploy.controller import Controller
from deploy.fleet_store import StationRecord
from deploy.plan import parse_plan
from deploy.rollout import Phase, RollbackRequested, StageStep
from linesight import protocol as p
from linesight.artifacts import (
    MANIFEST_FILE,
    MODEL_FILE,
    build_bundle,
    generate_keypair,
    load_private_key,
    parse_manifest,
)
from linesight.mqtt import LinkConfig, ReceivedMessage
from tests.support import V2

NAME, VERSION = "part-classifier-ng", "2.0.0"
ACTIVE = p.ModelRef(name="part-classifier-ng", version="1.0.0", sha256="a" * 64)
SHADOW_STAGE = {
    "name": "shadow", "stations": ["s1"], "mode": "shadow",
    "exit": {"min_parts": 300, "min_labelled_disagreements": 20, "max_duration_s": 3600},
    "gate": {"delta": 0.02, "escape_delta": 0.01, "min_labels": 15},
    "on_inconclusive": "rollback",
}
PROMOTE_STAGE = {"name": "promote", "stations": ["s1"], "mode": "promote"}


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    """A signed bundle whose model calls its classes 'good' and 'ng' (not 'ok' and 'defect')."""
    root = tmp_path / "bundles"
    folder = root / NAME / VERSION
    folder.mkdir(parents=True)
    shutil.copy(V2 / MODEL_FILE, folder / MODEL_FILE)
    shipped = parse_manifest((V2 / MANIFEST_FILE).read_bytes())
    generate_keypair(tmp_path / "site.key", tmp_path / "site.pub")
    build_bundle(
        folder, name=NAME, version=VERSION, description="labels good / ng",
        input=shipped.input, output=shipped.output, labels=("good", "ng"), defect_label="ng",
        thresholds={"ng": 0.5}, metrics=None, private_key=load_private_key(tmp_path / "site.key"),
    )
    return root


def config(tmp_path: Path, bundles: Path) -> ControllerConfig:
    return ControllerConfig(
        broker=LinkConfig(url="mqtt://127.0.0.1:1", client_id="unit-controller"),
        data_dir=tmp_path / "fleet", bundles=bundles, key=tmp_path / "site.pub",
    )


@pytest.fixture
def controller(tmp_path: Path, bundles: Path) -> Iterator[Controller]:
    built = Controller(config(tmp_path, bundles))
    try:
        yield built
    finally:
        built.store.close()


def restarted(controller: Controller) -> Controller:
    """A new controller on the same data_dir, as after a restart."""
    controller.store.close()
    return Controller(controller.config)


def received(message: p.Envelope) -> ReceivedMessage:
    topic = p.Topics(p.DEFAULT_PREFIX).station(message.station, p.Channel(message.kind))
    return ReceivedMessage(topic, message.to_json(), 1, False)


def deliver(controller: Controller, *messages: p.Envelope) -> None:
    controller.ingest([received(message) for message in messages])


def decision(station: str, seq: int, at: datetime | None = None) -> p.Decision:
    return p.Decision(
        station=station, seq=seq, ts=at or datetime.now(UTC), part_id=f"{station}-{seq}",
        decided_by=p.DecidedBy.ACTIVE, label="good", confidence=0.9, action=p.Action.PASS,
        model=ACTIVE, latency_ms=3.0, automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.SHADOW,
    )


class S1:
    """Station s1 as the controller hears it: its durable messages numbered in one seq stream."""

    def __init__(self) -> None:
        self.seqs = itertools.count()

    def online(self, controller: Controller) -> None:
        deliver(controller, p.StationState(station="s1", seq=0, online=True))

    def ack_pending(self, controller: Controller) -> None:
        """Ack every command the rollout waits for, as the agent would."""
        assert controller.rollout is not None
        deliver(controller, *(
            p.CommandAck(station=command.station, seq=next(self.seqs), cmd_id=command.cmd_id,
                         command=command.body["name"], ok=True)
            for command in controller.rollout.pending
        ))

    def start_observing(self, controller: Controller) -> None:
        """Start a shadow rollout of the 'ng' bundle on s1 and bring it to observing."""
        self.online(controller)
        controller.start_rollout(
            parse_plan({"name": "ng-plan", "stages": [SHADOW_STAGE, PROMOTE_STAGE]}), NAME,
            VERSION,
        )
        controller.tick()  # s1 chosen, deploy_candidate sent
        self.ack_pending(controller)
        assert controller.rollout is not None
        assert controller.rollout.record.step == StageStep.OBSERVING

    def promote(self, controller: Controller) -> str:
        """A rollout of the bundle straight to promotion on s1; its id."""
        self.online(controller)
        rollout_id = controller.start_rollout(
            parse_plan({"name": "promote-plan", "promote_without_evidence": True,
                        "stages": [PROMOTE_STAGE]}), NAME, VERSION
        ).rollout_id
        controller.tick()  # deploy_candidate
        self.ack_pending(controller)  # then promote
        self.ack_pending(controller)
        assert controller.rollout is not None and controller.rollout.phase == Phase.PROMOTED
        return rollout_id

    def candidate_passes_the_defects(self, controller: Controller) -> None:
        """920 parts both models pass; 60 the active model wrongly rejects (the candidate is
        right); 20 real defects ('ng' by the operator) that the active model catches and the
        candidate passes. Better overall, but it lets defects through."""
        assert controller.rollout is not None
        candidate = controller.rollout.candidate.model
        now = datetime.now(UTC)  # the stage observes from when it started: these come after
        messages: list[p.Envelope] = []

        def part(part_id: str, active: str, truth: str | None = None) -> None:
            messages.append(p.ShadowResult(
                station="s1", seq=next(self.seqs), ts=now, part_id=part_id,
                mode=p.DeploymentMode.SHADOW,
                active=p.ModelOpinion(model=ACTIVE, label=active, latency_ms=3.0),
                candidate=p.ModelOpinion(model=candidate, label="good", latency_ms=3.0),
                agree=active == "good",
            ))
            if truth is not None:
                messages.append(p.Verdict(
                    station="s1", seq=next(self.seqs), ts=now, part_id=part_id, operator="op",
                    outcome=p.VerdictOutcome.REJECT if truth == "ng" else p.VerdictOutcome.PASS,
                    label=truth, review_reason=p.ReviewReason.DISAGREEMENT, decided_at=now,
                ))

        for i in range(920):
            part(f"same-{i}", "good")
        for i in range(60):
            part(f"false-reject-{i}", "ng", truth="good")
        for i in range(20):
            part(f"escape-{i}", "ng", truth="ng")
        deliver(controller, *messages)


# --- the escaped-defect gate counts the candidate's own defect label --------------------------


def test_a_candidate_that_passes_ng_parts_fails_the_escape_gate(controller: Controller) -> None:
    s1 = S1()
    s1.start_observing(controller)
    s1.candidate_passes_the_defects(controller)
    controller.tick()
    state = controller.rollout
    assert state is not None
    assert state.stage == 0 and state.stages[0].outcome == "failed", state.history[-1]
    assert state.phase == Phase.ROLLING_BACK
    # The escape gate's verdict: 20 defects labelled 'ng', the candidate passed every one.
    assert state.reason.startswith("gate failed in 'shadow': fail: candidate right on 0 of 20 ")


def test_the_api_shows_the_escape_evidence_of_the_defect_label(controller: Controller) -> None:
    s1 = S1()
    s1.start_observing(controller)
    s1.candidate_passes_the_defects(controller)
    doc = create_app(controller).test_client().get("/api/rollouts/current").get_json()
    evidence = doc["evidence"]
    assert evidence["defect_label"] == "ng"
    assert evidence["escape_disagreements_labelled"] == 20
    assert evidence["escape_candidate_right"] == 0
    assert evidence["escape_gate"] == "fail"


def test_the_defect_label_is_kept_with_the_rollout(controller: Controller) -> None:
    """After a restart the gate still counts 'ng', with the bundle gone from the folder."""
    s1 = S1()
    s1.start_observing(controller)
    shutil.rmtree(controller.config.bundles)
    again = restarted(controller)
    try:
        s1.candidate_passes_the_defects(again)
        again.tick()
        assert again.rollout is not None and again.rollout.stages[0].outcome == "failed"
        assert "candidate right on 0 of 20 " in again.rollout.reason
    finally:
        again.store.close()


def test_a_rollout_saved_without_its_label_reads_it_from_its_bundle(
    controller: Controller,
) -> None:
    """A rollout saved by a controller from before the label was kept: the label comes from the
    candidate's manifest while that is still the one deployed, else it is 'defect'."""
    S1().start_observing(controller)
    state = controller.rollout
    assert state is not None
    controller.store.close()
    with contextlib.closing(sqlite3.connect(controller.config.data_dir / "fleet.db")) as conn:
        conn.execute("UPDATE rollouts SET defect_label = NULL")  # as an older build left it
        conn.commit()
    again = Controller(controller.config)
    try:
        assert again.defect_label(state) == "ng"
    finally:
        again.store.close()
    manifest = controller.config.bundles / NAME / VERSION / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"ng"', b'"NG"'))  # another manifest
    again = Controller(controller.config)
    try:
        assert again.defect_label(state) == "defect"
    finally:
        again.store.close()


# --- one payload that cannot be parsed is dropped alone ---------------------------------------


@pytest.mark.parametrize("ts", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00"])
def test_a_timestamp_outside_the_utc_range_drops_only_its_message(
    controller: Controller, ts: str
) -> None:
    """Such a ts cannot be converted to UTC (OverflowError): that message is invalid, the rest
    of the batch is stored as usual."""
    poison = json.loads(decision("s1", 0).to_json())
    poison["ts"] = ts
    topics = controller.topics
    upto = controller.ingest([
        received(decision("s2", 0)),
        ReceivedMessage(topics.station("s1", p.Channel.DECISION), json.dumps(poison).encode(),
                        1, False),
        received(p.StationState(station="s3", seq=0, online=False)),  # a Last Will
        received(decision("s2", 1)),
    ])
    assert {(key.station, seq) for key, seq in upto.items()} == {("s2", 1)}
    assert controller.counters.invalid == 1 and controller.counters.stored == 2
    assert [record.station for record in controller.store.stations()] == ["s2", "s3"]
    assert controller.store.contiguous("s1") == -1


# --- a station clock far ahead does not blow up the dashboard's series ------------------------


def test_a_future_dated_decision_does_not_lengthen_the_series(controller: Controller) -> None:
    now = datetime.now(UTC)
    deliver(controller, decision("s1", 0, now), decision("s1", 1, now + timedelta(days=30)))
    answer = create_app(controller).test_client().get("/api/series?minutes=30&bucket_s=30")
    points = answer.get_json()["points"]
    assert 1 <= len(points) <= 30 * 2 + 2, len(points)
    assert sum(point["parts"] for point in points) == 1


# --- the last rollout is still there after a restart ------------------------------------------


def test_a_promotion_can_be_rolled_back_after_a_restart(controller: Controller) -> None:
    rollout_id = S1().promote(controller)
    again = restarted(controller)
    try:
        client = create_app(again).test_client()
        current = client.get("/api/rollouts/current")
        assert current.status_code == 200
        assert current.get_json()["rollout_id"] == rollout_id
        assert current.get_json()["phase"] == "promoted"
        answer = client.post(f"/api/rollouts/{rollout_id}/rollback", json={"by": "qe"})
        assert answer.status_code == 200, answer.get_json()
        assert answer.get_json()["phase_detail"] == "rolling_back"
        assert again.rollout is not None
        assert [(c.station, c.body["name"]) for c in again.rollout.pending] == [("s1", "rollback")]
    finally:
        again.store.close()


def test_a_promotion_followed_by_a_newer_rollout_stays_as_it_is(controller: Controller) -> None:
    """Only the newest rollout comes back: a promotion that a later rollout followed (here one
    already ended) cannot be rolled back any more."""
    s1 = S1()
    first = s1.promote(controller)
    s1.start_observing(controller)
    s1.candidate_passes_the_defects(controller)
    controller.tick()  # the gate fails: rolling back
    s1.ack_pending(controller)
    assert controller.rollout is not None and controller.rollout.phase == Phase.ROLLED_BACK
    newest = controller.rollout.rollout_id
    again = restarted(controller)
    try:
        assert again.rollout is not None and again.rollout.rollout_id == newest
        client = create_app(again).test_client()
        answer = client.post(f"/api/rollouts/{first}/rollback", json={"by": "qe"})
        assert answer.status_code == 404, answer.get_json()
        assert client.post(f"/api/rollouts/{newest}/rollback", json={}).status_code == 409
    finally:
        again.store.close()


# --- the inventory: stations that join, rows an older controller stored ----------------------


def test_a_station_that_joins_while_the_stations_are_listed_is_no_error(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stations join at any moment: here one joins right after every read of the inventory.
    The list is one read, so it holds the stations as they were at that read."""
    S1().online(controller)
    read = controller.store.stations
    joined = itertools.count()

    def read_then_one_joins() -> list[StationRecord]:
        records = read()
        deliver(controller, p.StationState(station=f"new-{next(joined)}", seq=0, online=True))
        return records

    monkeypatch.setattr(controller.store, "stations", read_then_one_joins)
    answer = create_app(controller).test_client().get("/api/stations")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    assert [(s["station"], s["online"]) for s in answer.get_json()["stations"]] == [("s1", True)]


def test_rows_an_older_controller_stored_do_not_stop_the_tick_or_the_api(
    controller: Controller,
) -> None:
    """An older controller stored infinite numbers as null: s2's state and s1's latest metrics
    no longer validate. s2 is left out, s1 is listed without its metrics, and the rollout on
    s1 goes on: its tick runs and s1 still counts as online."""
    s1 = S1()
    s1.online(controller)
    deliver(controller, p.StationState(station="s2", seq=0, online=True),
            p.StationMetrics(station="s1", seq=0, window_s=5.0, parts=5))
    state = json.loads(p.StationState(station="s2", seq=0, online=True).to_json())
    state["drift"] = {"psi_brightness": None, "psi_contrast": 0, "psi_sharpness": 0,
                      "psi_confidence": 0, "window_parts": 100, "drifting": True}
    metrics = json.loads(p.StationMetrics(station="s1", seq=0, window_s=5.0, parts=5).to_json())
    metrics["latency"] = {"active": {"p50_ms": 1, "p95_ms": None, "p99_ms": 1, "count": 5}}
    with contextlib.closing(sqlite3.connect(controller.config.data_dir / "fleet.db")) as conn:
        conn.execute("UPDATE stations SET state_json = ? WHERE station = 's2'",
                     (json.dumps(state),))
        conn.execute("UPDATE stations SET metrics_json = ? WHERE station = 's1'",
                     (json.dumps(metrics),))
        conn.commit()

    s1.start_observing(controller)  # ticks: s1 chosen, its deploy_candidate acknowledged
    controller.tick()
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING
    assert controller.rollout.record.stations == ["s1"]
    client = create_app(controller).test_client()
    answer = client.get("/api/stations")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    listed = answer.get_json()["stations"]
    assert [(s["station"], s["online"], s["metrics"]) for s in listed] == [("s1", True, None)]
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert 'linesight_fleet_station_online{station="s1"} 1.0' in scraped.get_data(as_text=True)


def test_a_command_sent_before_a_long_restart_is_not_timed_out_at_once(
    controller: Controller,
) -> None:
    """The controller was down longer than the command timeout; the station's ack, sent
    meanwhile, comes after the restart, behind its backlog."""
    s1 = S1()
    s1.online(controller)
    controller.start_rollout(
        parse_plan({"name": "p", "stages": [SHADOW_STAGE, PROMOTE_STAGE]}), NAME, VERSION
    )
    controller.tick()  # deploy_candidate sent
    state = controller.rollout
    assert state is not None and len(state.pending) == 1
    down = timedelta(seconds=state.plan.command_timeout_s + 60)
    earlier = state.model_copy(update={"pending": [
        command.model_copy(update={"first_sent": command.first_sent - down,
                                   "last_sent": command.last_sent - down})
        for command in state.pending
    ]})
    controller.store.save_rollout(earlier.rollout_id, earlier.phase.value,
                                  earlier.model_dump_json(), earlier.updated)
    again = restarted(controller)
    try:
        s1.online(again)
        again.tick()
        assert again.rollout is not None
        assert again.rollout.phase == Phase.RUNNING, again.rollout.reason
        s1.ack_pending(again)
        assert again.rollout.record.step == StageStep.OBSERVING
    finally:
        again.store.close()


def test_a_station_away_during_its_rollback_is_rolled_back_when_it_returns(
    controller: Controller,
) -> None:
    """A promotion rolled back while s1 was away: every copy of its rollback expired before it
    came back (a station refuses an expired command), still running the candidate."""
    s1 = S1()
    rollout_id = s1.promote(controller)
    controller.apply(RollbackRequested(by="qe", reason="complaints"), rollout_id=rollout_id)
    state = controller.rollout
    assert state is not None and [c.station for c in state.pending] == ["s1"]
    gone = timedelta(seconds=controller.config.command_ttl_s + state.plan.command_timeout_s + 1)
    controller.rollout = state.model_copy(update={"pending": [
        command.model_copy(update={"first_sent": command.first_sent - gone,
                                   "last_sent": command.last_sent - gone})
        for command in state.pending
    ]})
    controller.tick()  # no ack: given up on, for now
    assert controller.rollout.phase == Phase.ROLLED_BACK and not controller.rollout.pending
    candidate = controller.rollout.candidate.model
    deliver(controller, p.StationState(station="s1", seq=1, online=True, active=candidate))
    controller.tick()
    assert [(c.station, c.body["name"]) for c in controller.rollout.pending] == [("s1", "rollback")]
    s1.ack_pending(controller)
    assert controller.rollout.pending == [] and controller.rollout.stranded == []
    assert controller.rollout.phase == Phase.ROLLED_BACK


# --- silence counts only while the controller could hear --------------------------------------


def _last_heard(controller: Controller, station: str, when: datetime) -> None:
    """As if the station's latest state had come in at `when`."""
    with contextlib.closing(sqlite3.connect(controller.config.data_dir / "fleet.db")) as conn:
        conn.execute("UPDATE stations SET last_seen_us = ? WHERE station = ?",
                     (round(when.timestamp() * 1_000_000), station))
        conn.commit()


def test_a_restart_after_a_long_stop_does_not_take_the_stations_for_silent(
    controller: Controller,
) -> None:
    """The controller was stopped ten minutes (a reboot of the line server, its broker not up
    yet): its stations said nothing it could hear, so they are not offline for that, and the
    running rollout is not rolled back before their states come in."""
    s1 = S1()
    s1.start_observing(controller)
    gone = timedelta(seconds=controller.config.offline_after_s * 5)
    _last_heard(controller, "s1", datetime.now(UTC) - gone)
    again = restarted(controller)
    try:
        again.tick()
        assert again.rollout is not None
        assert again.rollout.phase == Phase.RUNNING, again.rollout.reason
        assert again.fleet()["s1"].online
    finally:
        again.store.close()


def test_a_station_silent_while_the_controller_listens_goes_offline(
    controller: Controller,
) -> None:
    """Silence counts from when the link connected (or the station was last heard, if later),
    and stops counting while the link is down."""
    S1().online(controller)
    silence = controller.config.offline_after_s
    connected = datetime.now(UTC)
    _last_heard(controller, "s1", connected - timedelta(seconds=3 * silence))
    controller.link_up(connected)
    [record] = controller.store.stations()
    assert controller.view(record, connected + timedelta(seconds=silence / 2)).online
    assert not controller.view(record, connected + timedelta(seconds=silence + 1)).online
    controller.link_down(connected + timedelta(seconds=silence / 2))
    assert controller.view(record, connected + timedelta(seconds=silence * 10)).online
    controller.link_up(connected + timedelta(seconds=silence * 10))
    assert not controller.view(record, connected + timedelta(seconds=silence * 11 + 1)).online


def test_open_dashboards_reuse_the_evidence_the_tick_just_weighed(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage's evidence is a query over all its results (seconds, an hour into a stage at a
    plant's rate): every dashboard asks for it every 2 s, the tick every second. What the tick
    has just weighed is shown, not asked for again; an older one, or another stage's, is not."""
    s1 = S1()
    s1.start_observing(controller)
    s1.candidate_passes_the_defects(controller)
    queries: list[datetime] = []
    query = controller.store.paired_evidence

    def counted(*args: object, **kwargs: object) -> object:
        queries.append(datetime.now(UTC))
        return query(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(controller.store, "paired_evidence", counted)
    clock = itertools.count(1000.0, 0.5)
    monkeypatch.setattr(controller, "monotonic", lambda: next(clock))
    controller.tick()
    assert len(queries) == 1
    client = create_app(controller).test_client()
    for _ in range(3):
        doc = client.get("/api/rollouts/current").get_json()
        assert doc["evidence"]["escape_disagreements_labelled"] == 20
    assert len(queries) == 1, "the dashboards asked the store again for what the tick had"
    for _ in range(5):  # the clock moves on: the tick's evidence is too old to show
        client.get("/api/rollouts/current")
    assert len(queries) > 1
