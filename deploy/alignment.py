"""Which model each station should run, and whether it does.

A rollout that ends promoted made its candidate the active model of every station in its
`promoted` list. Later, a station can be running something else without any rollout saying so:
its `station.db` (or the whole device image) restored from a backup, a device swapped for a
spare set up with an older bundle, a model changed by hand. Such a station is "out of step": it
decides parts with a model the fleet moved on from. The controller shows it and can bring it
back (`Controller.realign`); it never does so by itself, because the station may be running
another model on purpose.

Pure functions over rollout states and what stations report; the controller keeps the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from deploy.plan import ByName, RolloutPlan, Stage
from deploy.rollout import Phase, RolloutState
from linesight import protocol as p


@dataclass(frozen=True, slots=True)
class Expected:
    """The model a promoted rollout made active on a station."""

    model: p.ModelRef
    rollout_id: str
    since: datetime
    """When that rollout was last changed (the controller's clock): a station state received
    before it may predate the promotion."""


def expected_models(rollouts: Iterable[RolloutState]) -> dict[str, Expected]:
    """Station -> the model its latest promoted rollout made active; `rollouts` oldest first.

    Only promoted rollouts count. One that was rolled back or aborted took every station it
    promoted back to the model it had before (or still owes the rollback), so what the station
    should run is what the promotion before it left."""
    expected: dict[str, Expected] = {}
    for state in rollouts:
        if state.phase != Phase.PROMOTED:
            continue
        for station in state.promoted:
            expected[station] = Expected(state.candidate.model, state.rollout_id, state.updated)
    return expected


def out_of_step(
    expected: Expected | None,
    active: p.ModelRef | None,
    last_seen: datetime | None,
    in_rollout: bool,
) -> bool:
    """True when the station's latest state names another active model than the expected one.

    Not while a running rollout has touched the station (it changes the models on purpose), and
    not on a state received before the expectation was set (the station's promotion and its
    new state cross on the way: the ack can arrive first)."""
    if expected is None or in_rollout or last_seen is None or last_seen <= expected.since:
        return False
    return active is None or active.sha256 != expected.model.sha256


_NAME_ROOM = 64  # a plan's and a stage's name hold at most 80 characters


def realign_plan(
    stations: Sequence[str], model: p.ModelRef, command_timeout_s: float
) -> RolloutPlan:
    """A one-stage plan that deploys `model` to `stations` and promotes it there, without
    gates: the model earned its promotion on each of them in the rollout that put it there."""
    named = ", ".join(stations)
    if len(named) > _NAME_ROOM:
        named = f"{len(stations)} stations"
    return RolloutPlan(
        name=f"realign {named}",
        description=f"bring {', '.join(stations)} back to {model.name} {model.version}, which a "
        "promoted rollout made their active model",
        stages=[Stage(name=f"promote on {named}", stations=ByName(names=list(stations)),
                      mode="promote")],
        command_timeout_s=command_timeout_s,
        promote_without_evidence=True,  # it earned its promotion there before
    )
