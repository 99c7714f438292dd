"""Rollout state machine edge cases: plans with unusual stage lists, restarts, late events."""

from __future__ import annotations

from typing import Any

from deploy.gates import PairedEvidence
from deploy.plan import parse_plan
from deploy.rollout import (
    CommandAcked,
    Phase,
    RolloutState,
    SendCommand,
    StageEvidence,
    StationView,
    Tick,
    restarted,
    start,
    transition,
)
from linesight.protocol import NIL_CMD_ID
from tests.unit.test_rollout import CANDIDATE, FLEET, Clock

NIL = str(NIL_CMD_ID)


def begin(stages: list[dict[str, Any]]) -> tuple[RolloutState, Clock]:
    plan = parse_plan({"name": "p", "command_timeout_s": 30, "command_retry_s": 5,
                       "promote_without_evidence": True, "stages": stages})
    clock = Clock()
    return start("r-1", plan, CANDIDATE, clock.now), clock


class Agents:
    """Acks as the stations would: a promote needs a candidate, which a promotion consumes."""

    def __init__(self) -> None:
        self.promoted: set[str] = set()

    def answer(self, state: RolloutState, sends: list[SendCommand], clock: Clock) -> RolloutState:
        for send in sends:
            ok = not (send.body.name == "promote" and send.station in self.promoted)
            if ok and send.body.name == "promote":
                self.promoted.add(send.station)
            ack = CommandAcked(send.cmd_id, send.station, ok=ok,
                               error=None if ok else "nothing to promote: no candidate")
            state, more = transition(state, ack, clock.step(0.1))
            state = self.answer(state, more, clock)
        return state


def test_a_station_promoted_by_an_earlier_stage_is_not_promoted_again() -> None:
    """Promote one station first, then the fleet: the pilot already runs the candidate as its
    active model, and a second promote there has no candidate to promote."""
    agents = Agents()
    state, clock = begin([
        {"name": "pilot", "stations": ["s1"], "mode": "promote"},
        {"name": "everywhere", "stations": "all", "mode": "promote"},
    ])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state = agents.answer(state, sends, clock)
    assert state.stage == 1 and state.phase == Phase.RUNNING
    state, sends = transition(state, Tick(FLEET), clock.step())
    state = agents.answer(state, sends, clock)
    assert state.phase == Phase.PROMOTED, state.reason
    assert agents.promoted == {"s1", "s2", "s3"}


def test_a_later_trial_stage_sends_nothing_to_a_station_already_promoted() -> None:
    agents = Agents()
    state, clock = begin([
        {"name": "pilot", "stations": ["s1"], "mode": "promote"},
        {"name": "canary", "stations": ["s1", "s2"], "mode": "canary", "fraction": 0.5},
        {"name": "everywhere", "stations": "all", "mode": "promote"},
    ])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state = agents.answer(state, sends, clock)
    state, sends = transition(state, Tick(FLEET), clock.step())
    # s1 has no candidate any more (it is its active model): no mode to set there.
    assert [(s.station, s.body.name) for s in sends] == [("s2", "deploy_candidate")]
    state = agents.answer(state, sends, clock)
    assert state.phase == Phase.RUNNING and state.record.step == "observing"


def test_a_station_named_twice_in_a_stage_gets_each_command_once() -> None:
    agents = Agents()
    state, clock = begin([{"name": "all at once", "stations": ["s2", "s1", "s2"],
                           "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    assert sorted(s.station for s in sends) == ["s1", "s2"]
    state = agents.answer(state, sends, clock)
    assert state.phase == Phase.PROMOTED, state.reason
    assert state.stages[0].stations == ["s1", "s2"]


def test_a_controller_restart_gives_pending_commands_a_new_timeout() -> None:
    """While the controller is down it cannot hear acks; after a restart longer than the
    command timeout, the acks the stations sent meanwhile are still to come."""
    state, clock = begin([{"name": "shadow", "stations": ["s1"], "mode": "shadow"},
                          {"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    down_until = clock.step(120)  # the controller was down for two minutes
    state = restarted(state, down_until)
    state, resent = transition(state, Tick(FLEET), clock.step())
    assert state.phase == Phase.RUNNING, state.reason
    assert [s.cmd_id for s in resent] == [sends[0].cmd_id]  # sent again at once, as it was due
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s1", ok=True), clock.step())
    assert state.record.step == "observing"
    state, _ = transition(state, Tick(FLEET), clock.step(31))
    assert state.phase == Phase.RUNNING


def test_after_a_restart_an_unanswered_command_still_times_out() -> None:
    state, clock = begin([{"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, _ = transition(state, Tick(FLEET), clock.step())
    state = restarted(state, clock.step(120))
    state, _ = transition(state, Tick(FLEET), clock.step(29))
    assert state.phase == Phase.RUNNING
    state, sends = transition(state, Tick(FLEET), clock.step(2))
    assert state.phase == Phase.ROLLING_BACK and "no ack in 30 s" in state.reason
    assert [s.body.name for s in sends] == ["rollback"]


def test_a_restart_past_a_stages_deadline_waits_for_the_evidence_sent_meanwhile() -> None:
    state, clock = begin([{"name": "shadow", "stations": ["s1"], "mode": "shadow",
                           "on_inconclusive": "rollback",
                           "exit": {"min_parts": 100, "max_duration_s": 60}},
                          {"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s1", ok=True), clock.step())
    assert state.record.step == "observing"
    thin = StageEvidence(overall=PairedEvidence(parts=10, disagreements=0,
                                                labelled_disagreements=0, candidate_right=0),
                         escapes=PairedEvidence(parts=10, disagreements=0,
                                                labelled_disagreements=0, candidate_right=0))
    state = restarted(state, clock.step(600))  # down for ten minutes, past the 60 s deadline
    state, _ = transition(state, Tick(FLEET, thin), clock.step())
    assert state.phase == Phase.RUNNING, "judged before the stations' backlog could come in"
    state, _ = transition(state, Tick(FLEET, thin), clock.step(30))
    assert state.phase == Phase.ROLLING_BACK and "inconclusive" in state.reason


# --- a station that was offline while its stage rolled back ----------------------------------

TTL = 3600.0


def rolled_back_while_s2_was_away() -> tuple[RolloutState, Clock, str]:
    """A canary on s1 and s2; s2 drops off the network, which rolls the stage back. s1 acks
    its rollback, s2 never does: the rollout ends rolled back with s2's rollback unanswered."""
    state, clock = begin([
        {"name": "canary", "stations": ["s1", "s2"], "mode": "canary", "fraction": 0.2},
        {"name": "promote", "stations": "all", "mode": "promote"},
    ])
    state, sends = transition(state, Tick(FLEET), clock.step())
    for send in sends:
        state, _ = transition(state, CommandAcked(send.cmd_id, send.station, ok=True),
                              clock.step(0.1))
    away = {**FLEET, "s2": StationView(online=False)}
    state, sends = transition(state, Tick(away), clock.step())
    assert sorted(s.station for s in sends) == ["s1", "s2"]
    by_station = {s.station: s for s in sends}
    state, _ = transition(state, CommandAcked(by_station["s1"].cmd_id, "s1", ok=True),
                          clock.step())
    state, _ = transition(state, Tick(away, command_ttl_s=TTL), clock.step(31))
    assert state.phase == Phase.ROLLED_BACK
    return state, clock, by_station["s2"].cmd_id


def holding(candidate: bool) -> dict[str, StationView]:
    sha = CANDIDATE.model.sha256 if candidate else None
    return {**FLEET, "s2": StationView(online=True, candidate_sha256=sha, active_sha256="a" * 64)}


def test_a_station_back_after_its_rollback_expired_gets_a_new_one() -> None:
    """Its queued rollbacks expired while it was away (a station refuses an expired command),
    so it came back still running the rolled-back candidate in canary."""
    state, clock, _ = rolled_back_while_s2_was_away()
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(600))
    assert sends == []  # its queued rollbacks are still valid: it carries them out itself
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(TTL))
    assert [(s.station, s.body.name) for s in sends] == [("s2", "rollback")]
    assert state.phase == Phase.ROLLED_BACK
    state, again = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(1))
    assert again == []  # sent once, then retried like any command
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s2", ok=True), clock.step())
    assert state.pending == [] and state.phase == Phase.ROLLED_BACK
    state, more = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(TTL))
    assert more == []


def test_a_station_back_without_the_candidate_gets_no_rollback() -> None:
    """A rollback where no candidate is would undo the station's previous promotion."""
    state, clock, _ = rolled_back_while_s2_was_away()
    state, sends = transition(state, Tick(holding(False), command_ttl_s=TTL),
                              clock.step(2 * TTL))
    assert sends == []
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(TTL))
    assert sends == []  # a deploy made since by someone else is not this rollout's to undo


def test_a_station_back_without_the_candidate_but_unsaved_still_owes_its_rollback() -> None:
    """It carried out a copy but could not save the change (slots_save): a restart would bring
    the candidate back, so the rollback is not settled until the state says it is saved."""
    state, clock, _ = rolled_back_while_s2_was_away()
    unsaved = {**FLEET, "s2": StationView(online=True, active_sha256="a" * 64, faults=1,
                                          fault_codes=("slots_save",))}
    state, sends = transition(state, Tick(unsaved, command_ttl_s=TTL), clock.step(2 * TTL))
    assert sends == [] and [c.station for c in state.stranded] == ["s2"]
    # It restarted before the save: back holding the candidate, every copy long expired.
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(TTL))
    assert [(s.station, s.body.name) for s in sends] == [("s2", "rollback")]


def test_a_station_whose_rollback_was_saved_is_settled() -> None:
    state, clock, _ = rolled_back_while_s2_was_away()
    unsaved = {**FLEET, "s2": StationView(online=True, active_sha256="a" * 64, faults=1,
                                          fault_codes=("slots_save",))}
    state, _ = transition(state, Tick(unsaved, command_ttl_s=TTL), clock.step(2 * TTL))
    state, sends = transition(state, Tick(holding(False), command_ttl_s=TTL), clock.step(1))
    assert sends == [] and state.stranded == []


def test_the_late_ack_of_a_rollback_given_up_on_settles_it() -> None:
    state, clock, cmd_id = rolled_back_while_s2_was_away()
    state, _ = transition(state, CommandAcked(cmd_id, "s2", ok=True), clock.step(60))
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(2 * TTL))
    assert sends == []


def test_a_refused_late_copy_leaves_the_rollback_owed() -> None:
    """Back after its rollback expired, the station first refuses the copy the broker kept
    for it (expired): the rollback is still owed, and a new one goes out."""
    state, clock, cmd_id = rolled_back_while_s2_was_away()
    state, _ = transition(state, CommandAcked(cmd_id, "s2", ok=False,
                                              error="command expired at ..."), clock.step(TTL))
    assert [c.station for c in state.stranded] == ["s2"]
    state, sends = transition(state, Tick(holding(True), command_ttl_s=TTL), clock.step(60))
    assert [(s.station, s.body.name) for s in sends] == [("s2", "rollback")]


def test_a_station_fault_is_named_in_the_reason() -> None:
    """Any fault a station reports fails its stage; the reason says which (not every fault is
    a model's: an operator backlog over the review quota is one too)."""
    state, clock = begin([{"name": "canary", "stations": ["s1"], "mode": "canary",
                           "fraction": 0.2},
                          {"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s1", ok=True), clock.step())
    faulty = {**FLEET, "s1": StationView(online=True, faults=1,
                                         fault_codes=("review_quota_exceeded",))}
    state, _ = transition(state, Tick(faulty), clock.step())
    assert state.phase == Phase.ROLLING_BACK
    assert "s1: 1 fault(s) reported: review_quota_exceeded" in state.reason, state.reason


def test_a_low_disk_warning_stops_no_rollout_but_a_failed_write_does() -> None:
    """disk_low warns while the station's disk still has room: it says nothing of the model on
    trial, so a canary goes on; the fault of a write that failed for want of space stops it."""
    state, clock = begin([{"name": "canary", "stations": ["s1"], "mode": "canary",
                           "fraction": 0.2},
                          {"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s1", ok=True), clock.step())
    low = {**FLEET, "s1": StationView(online=True, faults=1, fault_codes=("disk_low",))}
    state, _ = transition(state, Tick(low), clock.step())
    assert state.phase == Phase.RUNNING, state.reason
    full = {**FLEET, "s1": StationView(online=True, faults=2,
                                       fault_codes=("disk_low", "outbox_write"))}
    state, _ = transition(state, Tick(full), clock.step())
    assert state.phase == Phase.ROLLING_BACK
    assert state.reason.endswith("s1: 1 fault(s) reported: outbox_write"), state.reason


def test_a_state_without_promotions_or_owed_rollbacks_keeps_its_old_json_keys() -> None:
    """A controller built before those fields forbids unknown keys in the state it reads."""
    state, clock = begin([{"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, _ = transition(state, Tick(FLEET), clock.step())
    document = state.model_dump(mode="json")
    assert "promoted" not in document and "stranded" not in document
    assert RolloutState.model_validate_json(state.model_dump_json()) == state


def test_a_resumed_rollout_no_longer_gives_the_reason_it_was_paused_for() -> None:
    """A stage that ran out of time pauses with the reason; once resumed, the rollout runs
    again and its status (API, CLI, retained rollout topic) must not still say it is stuck."""
    from deploy.rollout import Resume, to_status
    from tests.unit.test_rollout import begin as begin_shadow
    from tests.unit.test_rollout import to_observing

    state, clock = begin_shadow(on_inconclusive="pause")
    state = to_observing(state, clock)
    nothing = StageEvidence(overall=PairedEvidence(0, 0, 0, 0), escapes=PairedEvidence(0, 0, 0, 0))
    state, _ = transition(state, Tick(FLEET, nothing), clock.step(601))
    assert state.phase == Phase.PAUSED and "inconclusive" in state.reason
    state, _ = transition(state, Resume(by="ops"), clock.step())
    assert state.phase == Phase.RUNNING
    assert state.reason == "" and to_status(state, 0).reason == ""
    assert any("inconclusive" in line for line in state.history), "the history keeps it"


def test_a_refusal_under_the_nil_cmd_id_fails_nothing_but_names_the_cause_at_the_timeout() -> None:
    """A station with a command key answers a command it cannot authenticate under the nil
    cmd_id: such an ack cannot be tied to ours (a forged one must not fail a rollout), but when
    the command then times out, the reason says what the station said."""
    state, clock = begin([{"name": "promote", "stations": ["s1", "s2"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    to_s1 = next(send for send in sends if send.station == "s1")
    refusal = ("command is not signed; this station accepts only signed commands "
               f"(it claimed cmd_id {to_s1.cmd_id})")
    for _ in range(3):  # each copy the controller sends is refused the same way
        state, more = transition(state, CommandAcked(NIL, "s1", ok=False, error=refusal),
                                 clock.step(1))
        assert more == [] and state.phase == Phase.RUNNING
    noted = [line for line in state.history if "could not authenticate" in line]
    assert len(noted) == 1 and noted[0].endswith(f"s1 refused a command it could not "
                                                 f"authenticate: {refusal}")
    # An ack under the nil cmd_id from a station with nothing pending changes nothing.
    state, _ = transition(state, CommandAcked(NIL, "s3", ok=False, error="x"), clock.step(1))
    assert not [line for line in state.history if line.endswith("authenticate: x")]
    state, _ = transition(state, CommandAcked(
        next(send for send in sends if send.station == "s2").cmd_id, "s2", ok=True),
        clock.step(1))
    state, _ = transition(state, Tick(FLEET), clock.step(30))
    assert state.phase == Phase.ROLLING_BACK
    assert state.reason == (f"no ack in 30 s for deploy_candidate to s1 (it refused a command "
                            f"it could not authenticate: {refusal})")
    assert RolloutState.model_validate_json(state.model_dump_json()) == state
