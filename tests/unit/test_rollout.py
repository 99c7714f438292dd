"""The rollout state machine, stepped tick by tick with a fake clock."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.gates import PairedEvidence
from deploy.plan import PlanError, load_plan, parse_plan, select_stations
from deploy.rollout import (
    Abort,
    Approve,
    CandidateSpec,
    CommandAcked,
    Pause,
    Phase,
    Resume,
    RollbackRequested,
    RolloutState,
    SendCommand,
    StageEvidence,
    StageStep,
    StationView,
    Tick,
    TransitionError,
    start,
    to_status,
    transition,
)
from linesight import protocol as p

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
CANDIDATE = CandidateSpec(
    model=p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64),
    url="http://fleet:8700/bundles/part-classifier/2.0.0/", signature="c2ln",
)
FLEET = {name: StationView(online=True, labels={"line": "A"}) for name in ("s1", "s2", "s3")}


def plan(**stage0: Any) -> Any:
    first = {
        "name": "shadow", "stations": ["s1"], "mode": "shadow",
        "exit": {"min_parts": 100, "min_labelled_disagreements": 10, "max_duration_s": 600},
        **stage0,
    }
    return parse_plan({
        "name": "test-plan",
        "command_timeout_s": 30, "command_retry_s": 5,
        "stages": [
            first,
            {"name": "canary", "stations": ["s1"], "mode": "canary", "fraction": 0.2,
             "exit": {"min_parts": 100, "min_labelled_disagreements": 10}},
            {"name": "everywhere", "stations": "all", "mode": "promote"},
        ],
    })


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def step(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def good_evidence() -> StageEvidence:
    return StageEvidence(
        overall=PairedEvidence(parts=1000, disagreements=80, labelled_disagreements=80,
                               candidate_right=72),
        escapes=PairedEvidence(parts=1000, disagreements=30, labelled_disagreements=30,
                               candidate_right=28),
    )


def escaping_evidence() -> StageEvidence:
    # Better overall, but it lets defects through that the active model catches.
    return StageEvidence(
        overall=PairedEvidence(parts=1000, disagreements=90, labelled_disagreements=90,
                               candidate_right=50),
        escapes=PairedEvidence(parts=1000, disagreements=80, labelled_disagreements=80,
                               candidate_right=10),
    )


def ack_all(state: RolloutState, sends: list[SendCommand], clock: Clock) -> RolloutState:
    for send in sends:
        ack = CommandAcked(send.cmd_id, send.station, ok=True)
        state, _ = transition(state, ack, clock.step(0.1))
    return state


def begin(**stage0: Any) -> tuple[RolloutState, Clock]:
    clock = Clock()
    return start("r-1", plan(**stage0), CANDIDATE, clock.now), clock


def to_observing(state: RolloutState, clock: Clock) -> RolloutState:
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert [s.body.name for s in sends] == ["deploy_candidate"] and sends[0].station == "s1"
    state = ack_all(state, sends, clock)
    assert state.record.step == StageStep.OBSERVING
    return state


def test_a_good_candidate_goes_through_every_stage_to_promotion() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, sends = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert not sends and state.stage == 1 and state.record.step == StageStep.PENDING
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert [(s.station, s.body) for s in sends] == [
        ("s1", p.SetMode(mode=p.DeploymentMode.CANARY, canary_fraction=0.2))
    ]
    state = ack_all(state, sends, clock)
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.stage == 2
    state, sends = transition(state, Tick(FLEET), clock.step())
    # s1 already has the candidate; s2 and s3 get it first, in shadow, then all are promoted.
    assert sorted((s.station, s.body.name) for s in sends) == [
        ("s2", "deploy_candidate"), ("s3", "deploy_candidate")
    ]
    state = ack_all(state, sends, clock)
    assert state.record.command_round == 1
    promotes = [c for c in state.pending]
    assert sorted((c.station, c.body["name"]) for c in promotes) == [
        ("s1", "promote"), ("s2", "promote"), ("s3", "promote")
    ]
    for command in promotes:
        ack = CommandAcked(command.cmd_id, command.station, ok=True)
        state, _ = transition(state, ack, clock.step())
    assert state.phase == Phase.PROMOTED
    status = to_status(state, seq=5)
    assert status.phase == "promoted" and [s.status for s in status.stages] == ["passed"] * 3


def test_later_waves_are_untouched_until_earlier_ones_pass() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    for _ in range(20):
        state, sends = transition(state, Tick(FLEET, None), clock.step())
        assert all(s.station == "s1" for s in sends)
    assert state.touched == ["s1"]


def test_waiting_for_evidence_keeps_collecting() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    thin = StageEvidence(
        overall=PairedEvidence(parts=50, disagreements=4, labelled_disagreements=4,
                               candidate_right=4),
        escapes=PairedEvidence(parts=50, disagreements=1, labelled_disagreements=1,
                               candidate_right=1),
    )
    state, sends = transition(state, Tick(FLEET, thin), clock.step())
    assert state.phase == Phase.RUNNING and state.stage == 0 and not sends
    assert "waiting" in state.record.gate


def test_a_candidate_that_lets_defects_escape_is_rolled_back() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, sends = transition(state, Tick(FLEET, escaping_evidence()), clock.step())
    assert state.phase == Phase.ROLLING_BACK
    assert [(s.station, s.body.name) for s in sends] == [("s1", "rollback")]
    assert "escapes" in state.reason or "gate failed" in state.reason
    state = ack_all(state, sends, clock)
    assert state.phase == Phase.ROLLED_BACK
    assert to_status(state, 1).stages[0].status == "failed"


def test_approval_holds_the_next_wave() -> None:
    state, clock = begin(approval=True)
    state = to_observing(state, clock)
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.phase == Phase.WAITING_APPROVAL
    for _ in range(5):
        state, sends = transition(state, Tick(FLEET), clock.step(60))
        assert not sends and state.phase == Phase.WAITING_APPROVAL
    state, _ = transition(state, Approve(by="qa-lead"), clock.step())
    assert state.phase == Phase.RUNNING and state.stage == 1
    assert any("approved by qa-lead" in line for line in state.history)
    with pytest.raises(TransitionError):
        transition(state, Approve(by="qa-lead"), clock.step())


def test_pause_and_resume() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, _ = transition(state, Pause(by="ops", reason="line stop"), clock.step())
    assert state.phase == Phase.PAUSED
    state, sends = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.phase == Phase.PAUSED and state.stage == 0 and not sends
    state, _ = transition(state, Resume(by="ops"), clock.step())
    assert state.phase == Phase.RUNNING
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.stage == 1
    with pytest.raises(TransitionError):
        transition(state, Resume(by="ops"), clock.step())


@pytest.mark.parametrize(("on_inconclusive", "phase"),
                         [("pause", Phase.PAUSED), ("rollback", Phase.ROLLING_BACK)])
def test_an_inconclusive_stage_ends_as_the_plan_says(on_inconclusive: str, phase: Phase) -> None:
    state, clock = begin(on_inconclusive=on_inconclusive)
    state = to_observing(state, clock)
    tie = StageEvidence(
        overall=PairedEvidence(parts=1000, disagreements=80, labelled_disagreements=20,
                               candidate_right=10),
        escapes=PairedEvidence(parts=1000, disagreements=20, labelled_disagreements=5,
                               candidate_right=3),
    )
    state, _ = transition(state, Tick(FLEET, tie), clock.step(300))
    assert state.phase == Phase.RUNNING
    state, _ = transition(state, Tick(FLEET, tie), clock.step(301))
    assert state.phase == phase and "inconclusive" in state.reason
    if phase == Phase.PAUSED:
        state, _ = transition(state, Resume(by="qa"), clock.step())
        state, _ = transition(state, Tick(FLEET, tie), clock.step(10))
        assert state.phase == Phase.RUNNING, "resuming buys a fresh maximum duration"


def test_a_station_going_offline_fails_its_stage() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    offline = {**FLEET, "s1": StationView(online=False)}
    state, sends = transition(state, Tick(offline, good_evidence()), clock.step())
    assert state.phase == Phase.ROLLING_BACK and "s1: station offline" in state.reason
    assert [s.body.name for s in sends] == ["rollback"]


def test_a_station_fault_can_pause_instead() -> None:
    state, clock = begin(on_station_fault="pause")
    state = to_observing(state, clock)
    faulty = {**FLEET, "s1": StationView(online=True, faults=1)}
    state, sends = transition(state, Tick(faulty), clock.step())
    assert state.phase == Phase.PAUSED and not sends and "fault" in state.reason


def test_a_lost_ack_is_retried_with_the_same_cmd_id_then_times_out() -> None:
    state, clock = begin()
    state, sends = transition(state, Tick(FLEET), clock.step())
    first = sends[0]
    state, again = transition(state, Tick(FLEET), clock.step(2))
    assert again == []
    state, again = transition(state, Tick(FLEET), clock.step(4))
    assert [s.cmd_id for s in again] == [first.cmd_id] and again[0].body == first.body
    assert state.pending[0].attempts == 2
    state, sends = transition(state, Tick(FLEET), clock.step(30))
    assert state.phase == Phase.ROLLING_BACK and "no ack" in state.reason
    assert [s.body.name for s in sends] == ["rollback"]


def test_a_late_ack_after_retry_is_accepted_once() -> None:
    state, clock = begin()
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, Tick(FLEET), clock.step(6))
    ack = CommandAcked(sends[0].cmd_id, "s1", ok=True)
    state, _ = transition(state, ack, clock.step())
    assert state.record.step == StageStep.OBSERVING
    again, extra = transition(state, ack, clock.step())
    assert again.record == state.record and extra == []


def test_a_refused_command_rolls_back() -> None:
    state, clock = begin()
    state = to_observing(state, clock)  # s1 holds the candidate
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert [s.body.name for s in sends] == ["set_mode"]
    state, rollback = transition(
        state, CommandAcked(sends[0].cmd_id, "s1", ok=False, error="disk full"), clock.step()
    )
    assert state.phase == Phase.ROLLING_BACK and "disk full" in state.reason
    assert [(s.station, s.body.name) for s in rollback] == [("s1", "rollback")]


def test_a_refused_deploy_sends_no_rollback_to_that_station() -> None:
    """A rollback on a station without our candidate would undo its previous promotion."""
    state, clock = begin(stations=["s1", "s2"])
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert sorted(s.station for s in sends) == ["s1", "s2"]
    by_station = {s.station: s for s in sends}
    state, _ = transition(state, CommandAcked(by_station["s1"].cmd_id, "s1", ok=True), clock.step())
    state, rollback = transition(
        state, CommandAcked(by_station["s2"].cmd_id, "s2", ok=False, error="download failed"),
        clock.step(),
    )
    assert state.phase == Phase.ROLLING_BACK
    assert [(s.station, s.body.name) for s in rollback] == [("s1", "rollback")]


def test_a_deploy_refused_by_the_only_station_ends_the_rollout_at_once() -> None:
    state, clock = begin()
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, rollback = transition(
        state, CommandAcked(sends[0].cmd_id, "s1", ok=False, error="digest mismatch"), clock.step()
    )
    assert rollback == []
    assert state.phase == Phase.ROLLED_BACK and "digest mismatch" in state.reason


def test_a_deploy_still_unanswered_is_rolled_back_too() -> None:
    """It may have landed: the station holds the candidate until told otherwise."""
    state, clock = begin(stations=["s1", "s2"])
    state, sends = transition(state, Tick(FLEET), clock.step())
    by_station = {s.station: s for s in sends}
    state, rollback = transition(
        state, CommandAcked(by_station["s2"].cmd_id, "s2", ok=False, error="download failed"),
        clock.step(),
    )
    assert [(s.station, s.body.name) for s in rollback] == [("s1", "rollback")]


def test_abort_rolls_back_every_touched_station_and_ends_aborted() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, sends = transition(state, Abort(by="qa", reason="wrong model"), clock.step())
    assert state.phase == Phase.ROLLING_BACK
    assert [s.station for s in sends] == ["s1"]
    state = ack_all(state, sends, clock)
    assert state.phase == Phase.ABORTED and "wrong model" in state.reason
    with pytest.raises(TransitionError):
        transition(state, Abort(by="qa"), clock.step())
    unchanged, none = transition(state, Tick(FLEET), clock.step())
    assert unchanged == state and none == []


def test_rollback_after_promotion_undoes_it() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state = state.model_copy(update={"phase": Phase.PROMOTED})
    state, sends = transition(state, RollbackRequested(by="qa", reason="complaints"), clock.step())
    assert [s.body.name for s in sends] == ["rollback"]
    state = ack_all(state, sends, clock)
    assert state.phase == Phase.ROLLED_BACK


def test_rollback_gives_up_on_a_silent_station_but_finishes() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, sends = transition(state, Abort(by="qa"), clock.step())
    state, _ = transition(state, Tick(FLEET), clock.step(31))
    assert state.phase == Phase.ABORTED
    assert any("giving up" in line for line in state.history)


def test_command_ids_are_deterministic_for_a_replayed_transition() -> None:
    state, clock = begin()
    first, sends_a = transition(state, Tick(FLEET), clock.step())
    second, sends_b = transition(state, Tick(FLEET), clock.now)
    assert sends_a == sends_b and first == second


def test_the_state_survives_a_json_round_trip() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    assert RolloutState.model_validate_json(state.model_dump_json()) == state


def test_station_selectors() -> None:
    fleet = {"a1": {"line": "A"}, "a2": {"line": "A"}, "b1": {"line": "B"}, "b2": {"line": "B"}}
    parsed = parse_plan({"name": "x", "stages": [
        {"name": "n", "stations": {"labels": {"line": "B"}}, "mode": "shadow"},
        {"name": "c", "stations": {"count": 3}, "mode": "shadow"},
        {"name": "pc", "stations": {"percent": 50}, "mode": "shadow"},
        {"name": "all", "stations": "all", "mode": "promote"},
    ]})
    selectors = [stage.stations for stage in parsed.stages]
    assert select_stations(selectors[0], fleet, []) == ["b1", "b2"]
    assert select_stations(selectors[1], fleet, ["b1", "b2"]) == ["a1", "b1", "b2"]
    assert select_stations(selectors[2], fleet, ["b2"]) == ["a1", "b2"]
    assert select_stations(selectors[3], fleet, []) == sorted(fleet)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"name": "x", "stages": [{"name": "a", "stations": ["s1"], "mode": "shadow"}]},
         "promote"),
        ({"name": "x", "stages": [{"name": "a", "stations": ["s1"], "mode": "canary"},
                                  {"name": "b", "stations": "all", "mode": "promote"}]},
         "fraction"),
        ({"name": "x", "stages": [{"name": "a", "stations": "all", "mode": "promote",
                                   "gate": {"alpah": 0.1}}]}, "stages.0.gate.alpah"),
        ({"name": "x"}, "stages"),
    ],
)
def test_bad_plans_name_the_problem(document: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(document)


def test_unknown_stations_are_refused() -> None:
    parsed = parse_plan({"name": "x", "promote_without_evidence": True, "stages": [
        {"name": "a", "stations": ["ghost"], "mode": "promote"}]})
    with pytest.raises(PlanError, match="ghost"):
        select_stations(parsed.stages[0].stations, {"s1": {}}, [])


def test_rare_defect_disagreements_pass_the_escape_gate_without_labels() -> None:
    from deploy.gates import GateConfig, GateOutcome, evaluate_rare_gate

    config = GateConfig(delta=0.01, min_labels=10)
    rare = PairedEvidence(parts=3000, disagreements=2, labelled_disagreements=2,
                          candidate_right=1)
    assert evaluate_rare_gate(rare, config).outcome == GateOutcome.PASS
    few_parts = PairedEvidence(parts=100, disagreements=2, labelled_disagreements=2,
                               candidate_right=1)
    assert evaluate_rare_gate(few_parts, config).outcome == GateOutcome.CONTINUE
    common = PairedEvidence(parts=3000, disagreements=300, labelled_disagreements=5,
                            candidate_right=1)
    assert evaluate_rare_gate(common, config).outcome == GateOutcome.CONTINUE


# --- a pause while commands are out -----------------------------------------------------------


def test_acks_that_arrive_while_paused_complete_the_round_after_resume() -> None:
    state, clock = begin()
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, Pause(by="ops", reason="shift change"), clock.step())
    state = ack_all(state, sends, clock)
    assert state.phase == Phase.PAUSED and state.record.step == StageStep.COMMANDING
    assert state.pending == [], "the ack is taken while paused"
    state, _ = transition(state, Resume(by="ops"), clock.step())
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert not sends and state.record.step == StageStep.OBSERVING
    assert state.record.deadline == clock.now + timedelta(seconds=600)
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.phase == Phase.RUNNING and state.stage == 1


def test_a_station_that_drops_out_during_its_deploy_and_comes_back_carries_on() -> None:
    state, clock = begin(on_station_fault="pause")
    state, sends = transition(state, Tick(FLEET), clock.step())
    offline = {**FLEET, "s1": StationView(online=False)}
    state, _ = transition(state, Tick(offline), clock.step())
    assert state.phase == Phase.PAUSED and "s1: station offline" in state.reason
    state = ack_all(state, sends, clock)  # back on the network, it acks its deploy
    state, _ = transition(state, Resume(by="ops"), clock.step())
    state, _ = transition(state, Tick(FLEET), clock.step())
    assert state.phase == Phase.RUNNING and state.record.step == StageStep.OBSERVING


def test_a_blue_green_round_acked_while_paused_switches_after_resume() -> None:
    state, clock = begin(mode="blue_green")
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert [s.body.name for s in sends] == ["deploy_candidate"]
    state, _ = transition(state, Pause(by="ops"), clock.step())
    state = ack_all(state, sends, clock)
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert not sends, "nothing moves forward while paused"
    state, _ = transition(state, Resume(by="ops"), clock.step())
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert [(s.station, s.body) for s in sends] == [("s1", p.Switch(to="candidate"))]
    state = ack_all(state, sends, clock)
    assert state.record.step == StageStep.OBSERVING


# --- acks from the wrong station ----------------------------------------------------------------


def test_an_ack_from_another_station_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    state, clock = begin()
    state, sends = transition(state, Tick(FLEET), clock.step())
    deploy = sends[0]
    assert deploy.station == "s1"
    for forged in (CommandAcked(deploy.cmd_id, "s2", ok=True),
                   CommandAcked(deploy.cmd_id, "s2", ok=False, error="forged")):
        after, more = transition(state, forged, clock.step())
        assert after == state and more == []
    assert "ignored an ack from s2" in caplog.text
    state, _ = transition(state, CommandAcked(deploy.cmd_id, "s1", ok=True), clock.step())
    assert state.record.step == StageStep.OBSERVING and state.deployed == ["s1"]


def test_another_station_cannot_answer_a_rollback() -> None:
    state, clock = begin()
    state = to_observing(state, clock)
    state, sends = transition(state, Abort(by="qa"), clock.step())
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s3", ok=True), clock.step())
    assert state.phase == Phase.ROLLING_BACK and len(state.pending) == 1
    state = ack_all(state, sends, clock)
    assert state.phase == Phase.ABORTED


# --- guards while the rollout is held -----------------------------------------------------------

FAULTY = {**FLEET, "s1": StationView(online=True, labels={"line": "A"}, faults=3)}
OFFLINE = {**FLEET, "s1": StationView(online=False, labels={"line": "A"})}


def canary_waiting_for_approval(**stage0: Any) -> tuple[RolloutState, Clock]:
    state, clock = begin(mode="canary", fraction=0.25, approval=True, **stage0)
    state = to_observing(state, clock)
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    assert state.phase == Phase.WAITING_APPROVAL
    return state, clock


@pytest.mark.parametrize(("fleet", "why"),
                         [(FAULTY, "s1: 3 fault(s)"), (OFFLINE, "s1: station offline")])
def test_a_canary_waiting_for_approval_still_rolls_back_on_a_station_fault(
    fleet: dict[str, StationView], why: str
) -> None:
    state, clock = canary_waiting_for_approval()
    state, _ = transition(state, Tick(FLEET), clock.step(3600))
    assert state.phase == Phase.WAITING_APPROVAL
    state, sends = transition(state, Tick(fleet), clock.step())
    assert state.phase == Phase.ROLLING_BACK and why in state.reason
    assert [(s.station, s.body.name) for s in sends] == [("s1", "rollback")]


def test_a_human_pause_does_not_switch_off_the_guards_of_a_canary() -> None:
    state, clock = begin(mode="canary", fraction=0.25)
    state = to_observing(state, clock)
    state, _ = transition(state, Pause(by="ops", reason="lunch"), clock.step())
    state, sends = transition(state, Tick(FAULTY), clock.step())
    assert state.phase == Phase.ROLLING_BACK and "s1: 3 fault(s)" in state.reason
    assert [s.body.name for s in sends] == ["rollback"]


def test_a_fault_while_waiting_for_approval_pauses_when_the_plan_says_so() -> None:
    state, clock = canary_waiting_for_approval(on_station_fault="pause")
    state, sends = transition(state, Tick(FAULTY), clock.step())
    assert state.phase == Phase.PAUSED and not sends and "s1: 3 fault(s)" in state.reason
    with pytest.raises(TransitionError):
        transition(state, Approve(by="qa-lead"), clock.step())
    again, sends = transition(state, Tick(FAULTY), clock.step())
    assert again.phase == Phase.PAUSED and not sends and again.history == state.history
    state, _ = transition(again, Resume(by="ops"), clock.step())
    assert state.phase == Phase.WAITING_APPROVAL, "resuming goes back to waiting for approval"
    state, _ = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, Approve(by="qa-lead"), clock.step())
    assert state.phase == Phase.RUNNING and state.stage == 1


def test_a_held_shadow_stage_is_watched_until_its_stations_confirm_shadow_mode() -> None:
    # s1 ran a canary in stage 0; stage 1 puts it back in shadow and is paused before s1 acks.
    rollout = parse_plan({
        "name": "canary-then-shadow", "command_timeout_s": 30, "command_retry_s": 5,
        "stages": [
            {"name": "canary", "stations": ["s1"], "mode": "canary", "fraction": 0.2},
            {"name": "shadow", "stations": ["s1", "s2"], "mode": "shadow"},
            {"name": "everywhere", "stations": "all", "mode": "promote"},
        ],
    })
    clock = Clock()
    state = to_observing(start("r-1", rollout, CANDIDATE, clock.now), clock)
    state, _ = transition(state, Tick(FLEET, good_evidence()), clock.step())
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert sorted((s.station, s.body.name) for s in sends) == [
        ("s1", "set_mode"), ("s2", "deploy_candidate")
    ]
    paused, _ = transition(state, Pause(by="ops"), clock.step())
    rolled, _ = transition(paused, Tick(FAULTY), clock.step())
    assert rolled.phase == Phase.ROLLING_BACK, "s1 may still be deciding parts as a canary"
    confirmed = ack_all(paused, sends, clock)
    held, more = transition(confirmed, Tick(FAULTY), clock.step())
    assert held.phase == Phase.PAUSED and not more, "a shadow candidate decides no part"


# --- numbers in a plan ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("exit.max_duration_s", ".inf", "stages.0.exit.max_duration_s: Input should be a finite"),
        ("exit.max_duration_s", ".nan", "stages.0.exit.max_duration_s: Input should be a finite"),
        ("exit.max_duration_s", "1e12", "stages.0.exit.max_duration_s: Input should be less"),
        ("gate.max_p95_latency_ms", ".inf", "stages.0.gate.max_p95_latency_ms: Input should be"),
        ("command_timeout_s", ".inf", "command_timeout_s: Input should be a finite"),
        ("command_timeout_s", "1e9", "command_timeout_s: Input should be less"),
        ("command_retry_s", ".inf", "command_retry_s: Input should be a finite"),
    ],
)
def test_plan_numbers_must_be_finite_and_bounded(setting: str, value: str, message: str) -> None:
    section, _, key = setting.rpartition(".")
    stage = f"{{name: shadow, stations: [s1], mode: shadow, {section}: {{{key}: {value}}}}}"
    top = ""
    if not section:
        stage, top = "{name: shadow, stations: [s1], mode: shadow}", f"{key}: {value}\n"
    document = yaml.safe_load(
        f"name: x\n{top}stages:\n  - {stage}\n  - {{name: p, stations: all, mode: promote}}\n"
    )
    with pytest.raises(PlanError, match=re.escape(message)):
        parse_plan(document)


def test_the_longest_stage_a_plan_allows_still_gets_a_deadline() -> None:
    from deploy.plan import MAX_STAGE_DURATION_S

    state, clock = begin(exit={"max_duration_s": MAX_STAGE_DURATION_S})
    state = to_observing(state, clock)
    assert state.record.deadline == clock.now + timedelta(seconds=MAX_STAGE_DURATION_S)


@pytest.mark.parametrize(("text", "said"), [
    ("[" * 5000 + "]" * 5000, "cannot be read as a plan"),
    ("name: x\nstages: [{exit: {min_parts: 1" + "0" * 5000 + "}}]", "cannot be read as a plan"),
    ("name: 2025-13-45", "cannot be read as a plan"),
])
def test_a_plan_file_that_cannot_be_read_is_a_plan_error(
    tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(PlanError, match=said):
        load_plan(path)


def test_the_rare_event_pass_counts_every_unlabelled_disagreement_as_a_possible_escape() -> None:
    """With a verdict backlog a few labels can estimate zero defect disagreements; the pass
    must not rely on that guess."""
    from deploy.gates import GateOutcome
    from deploy.rollout import judge

    stage = plan().stages[0]
    overall = PairedEvidence(parts=2000, disagreements=45, labelled_disagreements=5,
                             candidate_right=5)
    guessed = PairedEvidence(parts=2000, disagreements=0, labelled_disagreements=0,
                             candidate_right=0)
    backlog = StageEvidence(overall=overall, escapes=guessed, possible_escapes=40)
    assert judge(stage, backlog).escapes.outcome == GateOutcome.CONTINUE
    nothing_unlabelled = StageEvidence(overall=overall, escapes=guessed, possible_escapes=0)
    assert judge(stage, nothing_unlabelled).escapes.outcome == GateOutcome.PASS


def test_each_of_a_stages_two_gates_fails_at_half_beta() -> None:
    """Either gate failing rolls the stage back: at beta each, an equal candidate would be
    thrown away up to twice as often as the plan allows."""
    from deploy.gates import GateOutcome, evaluate_gate
    from deploy.rollout import gate_config, judge

    stage = plan().stages[0]
    full = gate_config(stage, escapes=False)
    half = dataclasses.replace(full, beta=full.beta / 2)
    none = PairedEvidence(parts=1000, disagreements=0, labelled_disagreements=0,
                          candidate_right=0)
    between = [
        evidence for right in range(0, 60)
        if evaluate_gate(evidence := PairedEvidence(1000, 60, 60, right), full).outcome
        == GateOutcome.FAIL
        and evaluate_gate(evidence, half).outcome == GateOutcome.CONTINUE
    ]
    assert between, "some evidence fails at beta but not at beta/2"
    verdicts = judge(stage, StageEvidence(overall=between[0], escapes=none))
    assert verdicts.overall.outcome == GateOutcome.CONTINUE
