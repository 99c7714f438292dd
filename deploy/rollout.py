"""The rollout state machine: one pure function, `transition(state, event, now)`.

It never reads a clock, a store or the network. The controller measures the evidence, passes it
in as an event, persists the returned state, and sends the returned commands. Command ids are
derived from the rollout id and a counter, so replaying a transition after a crash produces the
same ids and the stations' idempotency by cmd_id does the rest.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deploy.gates import (
    GateConfig,
    GateDecision,
    GateOutcome,
    GuardMetrics,
    PairedEvidence,
    evaluate_gate,
    evaluate_guards,
    evaluate_rare_gate,
)
from deploy.plan import PlanError, RolloutPlan, Stage, select_stations
from linesight import protocol as p

log = logging.getLogger(__name__)
_NIL_CMD_ID = str(p.NIL_CMD_ID)

ROLLOUT_NAMESPACE = uuid.UUID("5f0c2f7e-6a43-4d55-9d8e-8b8f6b1c2a10")


class Phase(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


TERMINAL = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED})


class StageStep(StrEnum):
    PENDING = "pending"  # stations not chosen yet
    COMMANDING = "commanding"  # commands out, waiting for acks
    OBSERVING = "observing"  # collecting evidence
    PASSED = "passed"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CandidateSpec(Strict):
    """The model under rollout and where stations fetch it."""

    model: p.ModelRef
    url: str
    signature: str


class PendingCommand(Strict):
    cmd_id: str
    station: str
    body: dict[str, Any]
    first_sent: datetime
    last_sent: datetime
    attempts: int = 1
    # The station answered a command it could not authenticate (under the nil cmd_id): why.
    refusal: str | None = Field(default=None, exclude_if=lambda value: value is None)
    # When a restarted controller took the command over and gave it a fresh timeout (once).
    taken_over: datetime | None = Field(default=None, exclude_if=lambda value: value is None)


class StageRecord(Strict):
    stations: list[str] = Field(default_factory=list)
    step: StageStep = StageStep.PENDING
    command_round: int = 0
    observing_since: datetime | None = None
    deadline: datetime | None = None
    # When a restarted controller gave the observing stage's deadline its grace (once).
    deadline_taken_over: datetime | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    gate: str = ""
    outcome: Literal["pending", "running", "passed", "failed"] = "pending"


def _empty(value: Sequence[object]) -> bool:
    return not value


class RolloutState(Strict):
    rollout_id: str
    plan: RolloutPlan
    candidate: CandidateSpec
    phase: Phase = Phase.RUNNING
    stage: int = 0
    stages: list[StageRecord]
    deployed: list[str] = Field(default_factory=list)
    # Left out of the JSON while empty, so a controller built before them can still read it.
    promoted: list[str] = Field(default_factory=list, exclude_if=_empty)
    """Stations whose promote was acked: the candidate is their active model now."""
    touched: list[str] = Field(default_factory=list)
    pending: list[PendingCommand] = Field(default_factory=list)
    stranded: list[PendingCommand] = Field(default_factory=list, exclude_if=_empty)
    """Rollbacks given up on unanswered (the station was away): sent again, once every copy
    has expired, if the station comes back still holding the candidate."""
    commands_issued: int = 0
    paused_from: Phase | None = None
    end_after_rollback: Phase | None = None
    reason: str = ""
    started: datetime
    updated: datetime
    history: list[str] = Field(default_factory=list)

    @property
    def current(self) -> Stage:
        return self.plan.stages[self.stage]

    @property
    def record(self) -> StageRecord:
        return self.stages[self.stage]


# --- events -----------------------------------------------------------------------------------


ADVISORY_FAULTS = frozenset({"disk_low", "broker_cert_expiring"})
"""Faults that warn while all is still well (a station's disk filling, with room left; a TLS
certificate to renew soon): shown wherever faults are, but they stop no rollout. Once a write
fails, or the certificate has expired, the fault that says so (outbox_write, broker_tls, ...)
does, or the station is offline."""


@dataclass(frozen=True, slots=True)
class StationView:
    """What the controller knows of one station right now."""

    online: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    faults: int = 0
    fault_codes: tuple[str, ...] = ()
    p95_latency_ms: float | None = None
    active_sha256: str | None = None
    candidate_sha256: str | None = None
    """The models in its active and candidate slots, as its latest state says."""


@dataclass(frozen=True, slots=True)
class StageEvidence:
    """Paired outcomes on the stage's stations since it started observing."""

    overall: PairedEvidence
    escapes: PairedEvidence
    """Only labelled disagreements whose true label is the defect: who let a defect pass."""
    p95_latency_ms: float | None = None
    possible_escapes: int | None = None
    """Disagreements that may be defects: the labelled defects and every unlabelled one. The
    rare-event pass counts these, never the estimate in `escapes`, which a few labels can put
    at zero; None: `escapes.disagreements`."""


@dataclass(frozen=True, slots=True)
class Tick:
    fleet: Mapping[str, StationView]
    evidence: StageEvidence | None = None
    command_ttl_s: float = 3600.0
    """How long after it was sent a station still carries out a command (its expires_at)."""


@dataclass(frozen=True, slots=True)
class CommandAcked:
    """A station's ack. `station` is the station that sent it (the topic it came on): an ack
    counts only for a command that was sent to that station."""

    cmd_id: str
    station: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Approve:
    by: str
    stage: int | None = None
    """The index of the stage the approval is meant for: refused unless that stage is the
    one waiting (a repeated or late request cannot approve a later stage); None: any."""


@dataclass(frozen=True, slots=True)
class Pause:
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Resume:
    by: str


@dataclass(frozen=True, slots=True)
class Abort:
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RollbackRequested:
    by: str
    reason: str = ""


Event = Tick | CommandAcked | Approve | Pause | Resume | Abort | RollbackRequested


Body = p.DeployCandidate | p.SetMode | p.SetAutomation | p.Promote | p.Rollback | p.Switch


@dataclass(frozen=True, slots=True)
class SendCommand:
    cmd_id: str
    station: str
    body: Body
    rollout_id: str


class TransitionError(ValueError):
    """An event that makes no sense in the rollout's current phase (e.g. approve when running)."""


# --- start ------------------------------------------------------------------------------------


def start(
    rollout_id: str, plan: RolloutPlan, candidate: CandidateSpec, now: datetime,
    by: str | None = None,
) -> RolloutState:
    """A new rollout; `by` (who started it) goes into its history."""
    who = f" by {by}" if by else ""
    return RolloutState(
        rollout_id=rollout_id, plan=plan, candidate=candidate,
        stages=[StageRecord() for _ in plan.stages], started=now, updated=now,
        history=[f"{now.isoformat()} started {plan.name} for {candidate.model.name} "
                 f"{candidate.model.version}{who}"],
    )


def restarted(state: RolloutState, now: datetime) -> RolloutState:
    """The rollout as a controller that starts at `now` takes it over. What the stations acked
    while no controller ran is still on its way (behind their backlog), so a pending command
    gets a fresh `command_timeout_s` from the take-over; for the same reason an observing stage
    is not judged inconclusive before the evidence sent meanwhile has had `command_timeout_s`
    to come in. Each gets that grace once (`taken_over`, `deadline_taken_over`): a controller
    restarting more often than the timeout (a crash loop) would otherwise wait for ever for a
    station that never answers. A command thus times out at most `command_timeout_s` after the
    first controller that took it over started."""
    update: dict[str, Any] = {"pending": [_taken_over(command, now) for command in state.pending]}
    if state.phase not in TERMINAL:
        record = _deadline_taken_over(state.record, now, state.plan.command_timeout_s)
        if record is not state.record:
            stages = list(state.stages)
            stages[state.stage] = record
            update["stages"] = stages
    return state.model_copy(update=update)


def _taken_over(command: PendingCommand, now: datetime) -> PendingCommand:
    """The command with its one take-over grace: its timeout counts from `now`."""
    if command.taken_over is not None:
        return command
    return command.model_copy(
        update={"first_sent": max(command.first_sent, now), "taken_over": now}
    )


def _deadline_taken_over(record: StageRecord, now: datetime, timeout_s: float) -> StageRecord:
    """An observing stage's record with its one take-over grace: its deadline no sooner than
    `timeout_s` after `now`."""
    if (record.step != StageStep.OBSERVING or record.deadline is None
            or record.deadline_taken_over is not None):
        return record
    grace = now + timedelta(seconds=timeout_s)
    return record.model_copy(
        update={"deadline": max(record.deadline, grace), "deadline_taken_over": now}
    )


# --- the transition ---------------------------------------------------------------------------

Result = tuple[RolloutState, list[SendCommand]]


def transition(state: RolloutState, event: Event, now: datetime) -> Result:
    """The next state and the commands to send. Raises TransitionError for a human request that
    does not apply in the current phase; machine events in a finished rollout change nothing
    but the rollbacks it still owes (`stranded`)."""
    if isinstance(event, Tick):
        return _tick(state, event, now)
    if isinstance(event, CommandAcked):
        return _acked(state, event, now)
    if isinstance(event, Approve):
        if event.stage is not None and event.stage != state.stage:
            raise TransitionError(f"{stage_text(state, event.stage)} is not waiting for "
                                  f"approval: the rollout is {state.phase.value} at "
                                  f"{stage_text(state, state.stage)}")
        if state.phase != Phase.WAITING_APPROVAL:
            raise TransitionError(f"nothing to approve: the rollout is {state.phase.value} at "
                                  f"{stage_text(state, state.stage)}")
        state = _note(state, now, f"approved by {event.by}", phase=Phase.RUNNING)
        return _advance(state, now)
    if isinstance(event, Pause):
        if state.phase not in (Phase.RUNNING, Phase.WAITING_APPROVAL):
            raise TransitionError(f"cannot pause a rollout that is {state.phase.value}")
        return _note(state, now, f"paused by {event.by}: {event.reason}".rstrip(": "),
                     phase=Phase.PAUSED, paused_from=state.phase), []
    if isinstance(event, Resume):
        if state.phase != Phase.PAUSED:
            raise TransitionError(f"cannot resume a rollout that is {state.phase.value}")
        record = state.record
        if record.step == StageStep.OBSERVING:
            # A fresh maximum duration: a pause for an inconclusive stage buys a new window,
            # with its own take-over grace.
            record = record.model_copy(update={
                "deadline": now + timedelta(seconds=state.current.exit.max_duration_s),
                "deadline_taken_over": None,
            })
        state = _with_record(state, record)
        # Why it paused stays in the history; the status no longer gives it as the rollout's.
        return _note(state, now, f"resumed by {event.by}",
                     phase=state.paused_from or Phase.RUNNING, paused_from=None, reason=""), []
    if isinstance(event, Abort | RollbackRequested):
        if state.phase in (Phase.ROLLED_BACK, Phase.ABORTED, Phase.ROLLING_BACK):
            raise TransitionError(f"the rollout is already {state.phase.value}")
        if isinstance(event, Abort) and state.phase == Phase.PROMOTED:
            # A late Abort, meant for the rollout while it ran, must not undo the promotion.
            raise TransitionError("nothing to abort: the rollout is promoted already; to undo "
                                  "its promotion on every station it promoted, use rollback")
        verb = "aborted" if isinstance(event, Abort) else "rollback requested"
        end = Phase.ABORTED if isinstance(event, Abort) else Phase.ROLLED_BACK
        return _rollback(state, now, f"{verb} by {event.by}: {event.reason}".rstrip(": "), end)
    raise TypeError(f"unknown event {event!r}")


def stage_text(state: RolloutState, index: int) -> str:
    """A stage as people see it: "stage 2 'canary on press-01'" (numbered from 1)."""
    if 0 <= index < len(state.plan.stages):
        return f"stage {index + 1} {state.plan.stages[index].name!r}"
    return f"stage {index + 1} (the plan has {len(state.plan.stages)})"


def _note(state: RolloutState, now: datetime, line: str, **update: Any) -> RolloutState:
    history = [*state.history, f"{now.isoformat()} {line}"][-200:]
    return state.model_copy(update={"updated": now, "history": history, **update})


def _with_record(state: RolloutState, record: StageRecord) -> RolloutState:
    stages = list(state.stages)
    stages[state.stage] = record
    return state.model_copy(update={"stages": stages})


def _issue(
    state: RolloutState, now: datetime, orders: list[tuple[str, Body]]
) -> tuple[RolloutState, list[SendCommand]]:
    """Give each (station, body) a deterministic cmd_id, remember it as pending, send it."""
    sends: list[SendCommand] = []
    pending = list(state.pending)
    counter = state.commands_issued
    touched = list(state.touched)
    for station, body in orders:
        counter += 1
        cmd_id = str(uuid.uuid5(ROLLOUT_NAMESPACE, f"{state.rollout_id}/{counter}"))
        sends.append(SendCommand(cmd_id, station, body, state.rollout_id))
        pending.append(PendingCommand(
            cmd_id=cmd_id, station=station, body=body.model_dump(mode="json"),
            first_sent=now, last_sent=now,
        ))
        if station not in touched:
            touched.append(station)
    state = state.model_copy(
        update={"pending": pending, "commands_issued": counter, "touched": touched}
    )
    return state, sends


def _stage_orders(state: RolloutState, round_: int) -> list[tuple[str, Body]]:
    """Commands of one round of the current stage, per station. Round 0 prepares the mode;
    blue_green and promote have a second round (switch, promote)."""
    stage = state.current
    spec = state.candidate
    orders: list[tuple[str, Body]] = []
    for station in state.record.stations:
        if station in state.promoted:
            continue  # an earlier stage promoted it: it has no candidate left to command
        deployed = station in state.deployed
        if round_ == 0:
            mode = {
                "shadow": p.DeploymentMode.SHADOW, "canary": p.DeploymentMode.CANARY,
                "blue_green": p.DeploymentMode.BLUE_GREEN, "promote": p.DeploymentMode.SHADOW,
            }[stage.mode]
            fraction = stage.fraction or 0.0
            if not deployed:
                orders.append((station, p.DeployCandidate(
                    url=spec.url, model=spec.model, signature=spec.signature, mode=mode,
                    canary_fraction=fraction,
                )))
            elif stage.mode != "promote":
                orders.append((station, p.SetMode(mode=mode, canary_fraction=fraction)))
        elif round_ == 1 and stage.mode == "blue_green":
            orders.append((station, p.Switch(to="candidate")))
        elif round_ == 1 and stage.mode == "promote":
            orders.append((station, p.Promote(expect=spec.model)))
    return orders


def _rounds(stage: Stage) -> int:
    return 2 if stage.mode in ("blue_green", "promote") else 1


def _begin_round(state: RolloutState, now: datetime, round_: int) -> Result:
    record = state.record.model_copy(
        update={"step": StageStep.COMMANDING, "command_round": round_, "outcome": "running"}
    )
    state = _with_record(state, record)
    state, sends = _issue(state, now, _stage_orders(state, round_))
    if not sends:
        return _round_done(state, now)
    return state, sends


def _round_done(state: RolloutState, now: datetime) -> Result:
    record = state.record
    if record.command_round + 1 < _rounds(state.current):
        return _begin_round(state, now, record.command_round + 1)
    if state.current.mode == "promote":
        return _stage_passed(state, now, "promoted on every station of the stage")
    stage = state.current
    record = record.model_copy(update={
        "step": StageStep.OBSERVING, "observing_since": now,
        "deadline": now + timedelta(seconds=stage.exit.max_duration_s),
    })
    return _note(_with_record(state, record), now, f"stage {stage.name!r} observing"), []


def _stage_passed(state: RolloutState, now: datetime, why: str) -> Result:
    record = state.record.model_copy(
        update={"step": StageStep.PASSED, "outcome": "passed", "gate": why}
    )
    state = _note(_with_record(state, record), now, f"stage {state.current.name!r} passed: {why}")
    if state.current.approval:
        return state.model_copy(update={"phase": Phase.WAITING_APPROVAL}), []
    return _advance(state, now)


def _advance(state: RolloutState, now: datetime) -> Result:
    if state.stage + 1 >= len(state.plan.stages):
        return _note(state, now, "promoted", phase=Phase.PROMOTED,
                     reason="every stage passed"), []
    # The next tick chooses the stage's stations from the fleet as it is then.
    return state.model_copy(update={"stage": state.stage + 1}), []


def _choose_stations(
    state: RolloutState, fleet: Mapping[str, StationView], now: datetime
) -> Result:
    try:
        stations = select_stations(
            state.current.stations, {name: dict(v.labels) for name, v in fleet.items()},
            state.touched,
        )
    except PlanError as exc:
        return _rollback(state, now, f"stage {state.current.name!r}: {exc}", Phase.ROLLED_BACK)
    offline = [s for s in stations if not fleet[s].online]
    if offline:
        return _station_trouble(state, now, f"stations offline at stage start: {offline}")
    record = state.record.model_copy(update={"stations": stations})
    state = _note(_with_record(state, record), now,
                  f"stage {state.current.name!r} on {', '.join(stations)}")
    return _begin_round(state, now, 0)


def _station_trouble(state: RolloutState, now: datetime, why: str) -> Result:
    """A station of the stage is offline or faulty: pause or roll back, as the plan says."""
    if state.current.on_station_fault == "pause":
        if state.phase == Phase.PAUSED:
            return state, []  # already held for a person, as the plan asks
        return _note(state, now, f"paused: {why}", phase=Phase.PAUSED,
                     paused_from=state.phase, reason=why), []
    return _rollback(state, now, why, Phase.ROLLED_BACK)


def _guard_trouble(state: RolloutState, fleet: Mapping[str, StationView]) -> str | None:
    """The first station of the current stage that is offline or reports a fault (other than
    an advisory one), and why."""
    config = gate_config(state.current, escapes=False)
    for station in state.record.stations:
        view = fleet.get(station, StationView(online=False))
        codes = tuple(code for code in view.fault_codes if code not in ADVISORY_FAULTS)
        faults = view.faults - (len(view.fault_codes) - len(codes))
        failures = evaluate_guards(
            GuardMetrics(online=view.online, faults=faults,
                         p95_latency_ms=None, disagreement_rate=None),
            config,
        )
        if failures:
            named = f": {', '.join(codes)}" if codes else ""
            return f"{station}: {'; '.join(failures)}{named}"
    return None


def _candidate_may_decide(state: RolloutState) -> bool:
    """Whether the candidate may be deciding parts on the current stage's stations: always in
    a canary, blue_green or promote stage; in a shadow stage only while a station has not yet
    acknowledged its switch to shadow (it may still run an earlier stage's canary)."""
    if state.current.mode != "shadow":
        return True
    return any(
        command.station in state.record.stations and command.body.get("name") == "set_mode"
        for command in state.pending
    )


def _round_open(state: RolloutState) -> bool:
    """Whether a command of the current stage's round is still waiting for its ack."""
    return any(command.station in state.record.stations for command in state.pending)


def _holding_candidate(
    state: RolloutState, unanswered: Sequence[PendingCommand] = ()
) -> list[str]:
    """The touched stations that may hold this rollout's candidate: its deploy was acked, or is
    still on its way or unanswered (it may have landed). A station whose deploy was refused
    holds none of ours, and a rollback there would undo the station's own previous promotion,
    which this rollout never made."""
    maybe = {
        command.station for command in [*state.pending, *unanswered]
        if command.body.get("name") == "deploy_candidate"
    }
    return [s for s in state.touched if s in state.deployed or s in maybe]


def _rollback(
    state: RolloutState, now: datetime, why: str, end: Phase,
    unanswered: Sequence[PendingCommand] = (),
) -> Result:
    targets = _holding_candidate(state, unanswered)
    record = state.record.model_copy(update={"outcome": "failed", "gate": why})
    state = _with_record(state, record).model_copy(update={"pending": []})
    state = _note(state, now, f"rolling back: {why}", phase=Phase.ROLLING_BACK,
                  reason=why, end_after_rollback=end)
    orders: list[tuple[str, Body]] = [
        (station, p.Rollback(reason=why[:500])) for station in targets
    ]
    state, sends = _issue(state, now, orders)
    if not sends:
        return _note(state, now, f"{end.value}: no station holds the candidate", phase=end), []
    return state, sends


def _acked(state: RolloutState, event: CommandAcked, now: datetime) -> Result:
    match = next((c for c in state.pending if c.cmd_id == event.cmd_id), None)
    if match is None:
        if event.cmd_id == _NIL_CMD_ID and not event.ok:
            return _refused_unproven(state, event, now)
        return _settle_stranded(state, event, now)  # else a late or repeated ack: handled
    if match.station != event.station:
        # Command ids are predictable: only the station a command went to may answer it.
        log.warning("ignored an ack from %s for command %s sent to %s",
                    event.station, event.cmd_id, match.station)
        return state, []
    pending = [c for c in state.pending if c.cmd_id != event.cmd_id]
    state = state.model_copy(update={"pending": pending, "updated": now})
    name = match.body.get("name")
    if state.phase == Phase.ROLLING_BACK:
        if not event.ok:
            state = _note(state, now, f"{match.station} could not roll back: {event.error}")
        return _finish_rollback_if_done(state, now)
    if state.phase in TERMINAL:  # a stranded rollback, sent again
        verdict = "rolled back" if event.ok else f"could not roll back: {event.error}"
        return _note(state, now, f"{match.station} {verdict} after its return"), []
    if not event.ok:
        return _rollback(state, now, f"{name} failed on {match.station}: {event.error}",
                         Phase.ROLLED_BACK)
    if name == "deploy_candidate" and match.station not in state.deployed:
        state = state.model_copy(update={"deployed": [*state.deployed, match.station]})
    if name == "promote" and match.station not in state.promoted:
        state = state.model_copy(update={"promoted": [*state.promoted, match.station]})
    # While paused the round stays as it is; the first tick after Resume completes it.
    if state.phase != Phase.RUNNING or state.record.step != StageStep.COMMANDING:
        return state, []
    if _round_open(state):
        return state, []
    return _round_done(state, now)


def _refused_unproven(state: RolloutState, event: CommandAcked, now: datetime) -> Result:
    """The station refused a command it could not authenticate (a controller that does not
    sign, or signs with another key than the station's command_key). Such an ack cannot be tied
    to our command, so it fails nothing; it is kept on the station's pending commands so that
    their time-out gives the reason, and noted once."""
    if not any(c.station == event.station for c in state.pending):
        return state, []
    refusal = (event.error or "no reason given")[:500]
    noted = all(c.refusal == refusal for c in state.pending if c.station == event.station)
    pending = [
        c.model_copy(update={"refusal": refusal}) if c.station == event.station else c
        for c in state.pending
    ]
    state = state.model_copy(update={"pending": pending, "updated": now})
    if noted:
        return state, []
    return _note(state, now, f"{event.station} refused a command it could not authenticate: "
                 f"{refusal}"), []


def _unanswered(command: PendingCommand) -> str:
    text = f"{command.body.get('name')} to {command.station}"
    if command.refusal is not None:
        text += f" (it refused a command it could not authenticate: {command.refusal})"
    return text


def _settle_stranded(state: RolloutState, event: CommandAcked, now: datetime) -> Result:
    """The late ack of a rollback given up on. Carried out, it settles the rollback; refused
    (typically a copy that expired while the station was away), the rollback is still owed:
    the next ticks send a new one if the station still holds the candidate."""
    match = next((c for c in state.stranded if c.cmd_id == event.cmd_id), None)
    if match is None or match.station != event.station:
        return state, []
    if not event.ok:
        return _note(state, now, f"{match.station} refused a late copy of its rollback "
                     f"({event.error}); still owed"), []
    stranded = [c for c in state.stranded if c.cmd_id != event.cmd_id]
    return _note(state, now, f"{match.station} rolled back (a late ack)", stranded=stranded), []


def _chase_stranded(state: RolloutState, event: Tick, now: datetime) -> Result:
    """A finished rollout sends a stranded rollback again once its station is back holding
    this candidate, and every copy sent before has expired there (a station carries out a
    valid copy itself, and a second rollback would undo its previous promotion). It is settled
    once the station is back without the candidate, and has saved that (no `slots_save`)."""
    stranded: list[PendingCommand] = []
    orders: list[tuple[str, Body]] = []
    sha = state.candidate.model.sha256
    for command in state.stranded:
        view = event.fleet.get(command.station)
        if view is None or not view.online:
            stranded.append(command)
            continue
        holds = view.candidate_sha256 == sha or (
            view.active_sha256 == sha and view.candidate_sha256 is None
            and command.station in state.promoted
        )
        if not holds and "slots_save" in view.fault_codes:
            # A copy carried out whose change the station could not save (it acks once it
            # has): a restart before the save brings the candidate back.
            stranded.append(command)
        elif not holds:
            state = _note(state, now, f"{command.station} is back without the candidate")
        elif (now - command.last_sent).total_seconds() <= event.command_ttl_s:
            stranded.append(command)  # its copies may still be carried out
        else:
            orders.append((command.station, _body_of(command.body)))
    state = state.model_copy(update={"stranded": stranded})
    if not orders:
        return state, []
    state = _note(state, now, "back with the candidate, rolled back again: "
                  + ", ".join(station for station, _ in orders))
    return _issue(state, now, orders)


def _finish_rollback_if_done(state: RolloutState, now: datetime) -> Result:
    if state.pending:
        return state, []
    end = state.end_after_rollback or Phase.ROLLED_BACK
    return _note(state, now, f"{end.value}: every touched station rolled back", phase=end), []


def _retry(state: RolloutState, now: datetime) -> Result:
    """Send again what is not acked; a command unanswered past the plan's timeout fails."""
    plan = state.plan
    sends: list[SendCommand] = []
    pending: list[PendingCommand] = []
    expired: list[PendingCommand] = []
    for command in state.pending:
        if (now - command.first_sent).total_seconds() > plan.command_timeout_s:
            expired.append(command)
            continue
        if (now - command.last_sent).total_seconds() >= plan.command_retry_s:
            command = command.model_copy(
                update={"last_sent": now, "attempts": command.attempts + 1}
            )
            body = _body_of(command.body)
            sends.append(SendCommand(command.cmd_id, command.station, body, state.rollout_id))
        pending.append(command)
    state = state.model_copy(update={"pending": pending})
    if expired:
        late = ", ".join(_unanswered(c) for c in expired)
        if state.phase == Phase.ROLLING_BACK or state.phase in TERMINAL:
            state = _note(state, now, f"no ack for {late}; giving up on those stations until "
                          "they are back", stranded=[*state.stranded, *expired])
            if state.phase in TERMINAL:
                return state, sends
            finished, more = _finish_rollback_if_done(state, now)
            return finished, [*sends, *more]
        rolled, more = _rollback(state, now, f"no ack in {plan.command_timeout_s:g} s for {late}",
                                 Phase.ROLLED_BACK, unanswered=expired)
        return rolled, more
    return state, sends


def _body_of(document: dict[str, Any]) -> Body:
    body: Body = p.COMMAND_BODY_ADAPTER.validate_python(document)
    return body


def gate_config(stage: Stage, *, escapes: bool) -> GateConfig:
    settings = stage.gate
    return GateConfig(
        delta=settings.escape_delta if escapes else settings.delta,
        alpha=settings.alpha, beta=settings.beta, min_labels=settings.min_labels,
        max_disagreement_rate=settings.max_disagreement_rate,
        max_p95_latency_ms=settings.max_p95_latency_ms,
    )


@dataclass(frozen=True, slots=True)
class Verdicts:
    overall: GateDecision
    escapes: GateDecision


def judge(stage: Stage, evidence: StageEvidence) -> Verdicts:
    """Both gates of a stage. Either one failing rolls the stage back, so each fails at beta/2:
    a candidate as good as the active one is thrown away with at most the plan's beta.
    The defect disagreements are the labelled defect share of all disagreements scaled up, so
    the escape gate is told what they were estimated from."""
    overall, escapes = (
        replace(gate_config(stage, escapes=flag), beta=stage.gate.beta / 2)
        for flag in (False, True)
    )
    return Verdicts(
        evaluate_gate(evidence.overall, overall),
        evaluate_rare_gate(evidence.escapes, escapes, possible=evidence.possible_escapes,
                           estimated_from=evidence.overall),
    )


def _tick(state: RolloutState, event: Tick, now: datetime) -> Result:
    if state.phase in TERMINAL:
        if not (state.pending or state.stranded):
            return state, []
        state, sends = _retry(state, now)
        state, more = _chase_stranded(state, event, now)
        return state, [*sends, *more]
    state, sends = _retry(state, now)
    if state.phase in (Phase.WAITING_APPROVAL, Phase.PAUSED):
        # Held for a person, but a candidate that decides parts is still watched.
        trouble = _guard_trouble(state, event.fleet) if _candidate_may_decide(state) else None
        if trouble is None:
            return state, sends
        state, more = _station_trouble(state, now, trouble)
        return state, [*sends, *more]
    if state.phase != Phase.RUNNING:
        return state, sends
    record = state.record
    if record.step == StageStep.PENDING:
        state, more = _choose_stations(state, event.fleet, now)
        return state, [*sends, *more]
    if record.step == StageStep.PASSED:
        return state, sends
    stage = state.current
    # Guards: every station of the stage must stay online and fault-free, in any step.
    trouble = _guard_trouble(state, event.fleet)
    if trouble is not None:
        state, more = _station_trouble(state, now, trouble)
        return state, [*sends, *more]
    if record.step == StageStep.COMMANDING and not _round_open(state):
        # Every ack of the round came in while the rollout was paused.
        state, more = _round_done(state, now)
        return state, [*sends, *more]
    if record.step != StageStep.OBSERVING or event.evidence is None:
        return state, sends
    evidence = event.evidence
    overall = evidence.overall
    rate = overall.disagreements / overall.parts if overall.parts else None
    enough_parts = overall.parts >= stage.exit.min_parts
    guard_failures = evaluate_guards(
        GuardMetrics(online=True, faults=0, p95_latency_ms=evidence.p95_latency_ms,
                     disagreement_rate=rate if enough_parts else None),
        gate_config(stage, escapes=False),
    )
    if guard_failures:
        state, more = _rollback(state, now, f"stage {stage.name!r}: {'; '.join(guard_failures)}",
                                Phase.ROLLED_BACK)
        return state, [*sends, *more]
    verdicts = judge(stage, evidence)
    note = f"error: {verdicts.overall.reason} | escapes: {verdicts.escapes.reason}"
    state = _with_record(state, record.model_copy(update={"gate": note}))
    if GateOutcome.FAIL in (verdicts.overall.outcome, verdicts.escapes.outcome):
        failed = verdicts.overall if verdicts.overall.outcome == GateOutcome.FAIL \
            else verdicts.escapes
        state, more = _rollback(state, now, f"gate failed in {stage.name!r}: {failed.reason}",
                                Phase.ROLLED_BACK)
        return state, [*sends, *more]
    exit_met = (
        enough_parts
        and overall.labelled_disagreements >= stage.exit.min_labelled_disagreements
    )
    both_pass = verdicts.overall.outcome == verdicts.escapes.outcome == GateOutcome.PASS
    if exit_met and both_pass:
        state, more = _stage_passed(state, now, note)
        return state, [*sends, *more]
    if record.deadline is not None and now >= record.deadline:
        why = f"stage {stage.name!r} inconclusive after {stage.exit.max_duration_s:g} s: {note}"
        if stage.on_inconclusive == "pause":
            state = _note(state, now, f"paused: {why}", phase=Phase.PAUSED,
                          paused_from=Phase.RUNNING, reason=why)
            return state, sends
        state, more = _rollback(state, now, why, Phase.ROLLED_BACK)
        return state, [*sends, *more]
    return state, sends


# --- views ------------------------------------------------------------------------------------


def to_status(state: RolloutState, seq: int) -> p.RolloutStatus:
    phase_map: dict[Phase, str] = {
        Phase.RUNNING: "running", Phase.WAITING_APPROVAL: "waiting_approval",
        Phase.PAUSED: "paused", Phase.ROLLING_BACK: "running", Phase.PROMOTED: "promoted",
        Phase.ROLLED_BACK: "rolled_back", Phase.ABORTED: "aborted",
    }
    stages = []
    for index, (stage, record) in enumerate(zip(state.plan.stages, state.stages, strict=True)):
        status = {
            "pending": "pending", "running": "running", "passed": "passed", "failed": "failed",
        }[record.outcome]
        if index == state.stage and state.phase == Phase.WAITING_APPROVAL:
            status = "waiting_approval"
        stages.append(p.StageStatus(
            index=index, name=stage.name, mode=stage.mode, stations=record.stations,
            status=status,  # type: ignore[arg-type]
            gate=record.gate[:2000] or None,
        ))
    reason = state.reason
    if state.phase == Phase.ROLLING_BACK:
        reason = f"rolling back: {reason}"
    return p.RolloutStatus(
        station=p.CONTROLLER_ID, seq=seq, rollout_id=state.rollout_id, plan=state.plan.name,
        candidate=state.candidate.model,
        phase=phase_map[state.phase],  # type: ignore[arg-type]
        stage=state.stage, stages=stages, reason=reason, touched=state.touched,
    )
