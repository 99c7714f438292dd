"""A controller that takes a rollout over (a restart) gives what waits on the stations a grace of
`command_timeout_s`, once: a controller in a crash loop, restarting more often than the timeout,
still times out a command no station answers, and still ends a stage that stays inconclusive."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from deploy.controller import Controller
from deploy.gates import PairedEvidence
from deploy.plan import parse_plan
from deploy.rollout import (
    CommandAcked,
    Phase,
    RolloutState,
    StageEvidence,
    Tick,
    restarted,
    transition,
)
from linesight import protocol as p
from linesight.mqtt import ReceivedMessage
from tests.support import unstarted_controller
from tests.unit.test_rollout import FLEET
from tests.unit.test_rollout_edges import begin

TIMEOUT_S = 30  # the plan's command_timeout_s in `begin`
RESTART_EVERY_S = 20  # a crash loop: up for 20 s at most, less than the timeout
THIN = StageEvidence(
    overall=PairedEvidence(parts=10, disagreements=0, labelled_disagreements=0,
                           candidate_right=0),
    escapes=PairedEvidence(parts=10, disagreements=0, labelled_disagreements=0,
                           candidate_right=0),
)


def test_a_crash_looping_controller_still_times_out_an_unanswered_command() -> None:
    state, clock = begin([{"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    sent = clock.now
    assert [s.body.name for s in sends] == ["deploy_candidate"]
    for _ in range(20):  # s1 never answers; the controller restarts every 20 s
        state = restarted(state, clock.step(RESTART_EVERY_S))
        state, sends = transition(state, Tick(FLEET), clock.step(0.5))
        if state.phase != Phase.RUNNING:
            break
    assert state.phase == Phase.ROLLING_BACK, "the rollout waits for ever"
    assert f"no ack in {TIMEOUT_S} s for deploy_candidate to s1" in state.reason
    waited = (clock.now - sent).total_seconds()
    assert waited <= 2 * TIMEOUT_S + RESTART_EVERY_S + 1, waited
    assert [s.body.name for s in sends] == ["rollback"]


def test_each_command_gets_its_own_grace_at_a_take_over() -> None:
    """A command sent after a take-over gets its grace at the next one, though the command
    before it already had its own."""
    state, clock = begin([{"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, deploy = transition(state, Tick(FLEET), clock.step())
    state = restarted(state, clock.step(25))  # the deploy: a fresh 30 s from here
    state, promote = transition(state, CommandAcked(deploy[0].cmd_id, "s1", ok=True),
                                clock.step())
    assert [s.body.name for s in promote] == ["promote"]
    state = restarted(state, clock.step(25))  # the promote, sent 25 s ago: 30 s from here
    state, _ = transition(state, Tick(FLEET), clock.step(20))
    assert state.phase == Phase.RUNNING, state.reason
    state, _ = transition(state, CommandAcked(promote[0].cmd_id, "s1", ok=True), clock.step())
    assert state.phase == Phase.PROMOTED, state.reason


def test_a_crash_loop_does_not_hold_an_inconclusive_stage_open_for_ever() -> None:
    state, clock = begin([{"name": "shadow", "stations": ["s1"], "mode": "shadow",
                           "on_inconclusive": "rollback",
                           "exit": {"min_parts": 100, "max_duration_s": 60}},
                          {"name": "promote", "stations": ["s1"], "mode": "promote"}])
    state, sends = transition(state, Tick(FLEET), clock.step())
    state, _ = transition(state, CommandAcked(sends[0].cmd_id, "s1", ok=True), clock.step())
    observing = clock.now
    for _ in range(20):  # thin evidence; the controller restarts every 20 s
        state = restarted(state, clock.step(RESTART_EVERY_S))
        state, _ = transition(state, Tick(FLEET, THIN), clock.step(0.5))
        if state.phase != Phase.RUNNING:
            break
    assert state.phase == Phase.ROLLING_BACK and "inconclusive" in state.reason, state.reason
    waited = (clock.now - observing).total_seconds()
    assert waited <= 60 + TIMEOUT_S + RESTART_EVERY_S + 1, waited


# --- the same through the controller, restarted over its store --------------------------------


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    built = unstarted_controller(tmp_path)
    try:
        yield built
    finally:
        built.store.close()


def aged(state: RolloutState, by: timedelta) -> RolloutState:
    """The state as it reads `by` later: every time its pending commands hold moved back."""
    pending = [
        command.model_copy(update={
            name: value - by for name, value in command if isinstance(value, datetime)
        })
        for command in state.pending
    ]
    return state.model_copy(update={"pending": pending, "updated": state.updated - by})


def test_controllers_restarting_faster_than_the_timeout_still_time_a_command_out(
    controller: Controller,
) -> None:
    """Each controller runs 20 s (its store aged by that much) before the next takes over;
    s1 is online but never acks its deploy."""
    state_doc = p.StationState(station="s1", seq=0, online=True)
    topic = controller.topics.station("s1", p.Channel.STATE)
    plan = parse_plan({
        "name": "p", "command_timeout_s": TIMEOUT_S, "command_retry_s": 5,
        "promote_without_evidence": True,
        "stages": [{"name": "promote", "stations": ["s1"], "mode": "promote"}],
    })
    controller.ingest([ReceivedMessage(topic, state_doc.to_json(), 1, False)])
    controller.start_rollout(plan, "part-classifier", "2.0.0")
    controller.tick()
    current = controller
    try:
        for _ in range(10):
            state = current.rollout
            assert state is not None
            if state.phase != Phase.RUNNING:
                break
            older = aged(state, timedelta(seconds=RESTART_EVERY_S))
            current.store.save_rollout(older.rollout_id, older.phase.value,
                                       older.model_dump_json(), older.updated)
            current.store.close()
            current = Controller(current.config)  # the next one takes over
            current.ingest([ReceivedMessage(topic, state_doc.to_json(), 1, False)])
            current.link_up()
            current.tick()
        state = current.rollout
        assert state is not None and state.phase == Phase.ROLLING_BACK, "waits for ever"
        assert f"no ack in {TIMEOUT_S} s" in state.reason
    finally:
        current.store.close()
        controller.store.close()
