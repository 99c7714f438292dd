"""Which model each station should run (deploy/alignment.py), and the controller's realign
request: pure functions, then the API of a controller that is built but never started."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from deploy.alignment import Expected, expected_models, out_of_step, realign_plan
from deploy.api import create_app
from deploy.controller import Controller
from deploy.plan import parse_plan
from deploy.rollout import CandidateSpec, Phase, RolloutState, start
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, sha256_file
from tests.support import V1, V2, unstarted_controller

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
NAME = "part-classifier"


def model(version: str, sha: str | None = None) -> p.ModelRef:
    return p.ModelRef(name=NAME, version=version, sha256=sha or version[0] * 64)


def rollout(rollout_id: str, ref: p.ModelRef, phase: Phase, promoted: list[str],
            updated: datetime, touched: list[str] | None = None) -> RolloutState:
    plan = parse_plan({"name": "p", "stages": [{"name": "all", "stations": "all",
                                                 "mode": "promote"}]})
    spec = CandidateSpec(model=ref, url="http://controller/bundles/x/", signature="s")
    return start(rollout_id, plan, spec, updated).model_copy(update={
        "phase": phase, "promoted": promoted, "touched": touched or promoted,
    })


# --- expected_models ---------------------------------------------------------------------------


def test_the_latest_promoted_rollout_of_each_station_sets_its_model() -> None:
    v1, v2, v3 = model("1.0.0"), model("2.0.0"), model("3.0.0")
    found = expected_models([
        rollout("a", v1, Phase.PROMOTED, ["s1", "s2", "s3"], T0),
        rollout("b", v2, Phase.PROMOTED, ["s1", "s2"], T0 + timedelta(hours=1)),
        # Rolled back and aborted rollouts took their stations back: they set nothing, even
        # where they had promoted before the rollback.
        rollout("c", v3, Phase.ROLLED_BACK, ["s1"], T0 + timedelta(hours=2)),
        rollout("d", v3, Phase.ABORTED, ["s2"], T0 + timedelta(hours=3)),
        # A running rollout has not promoted yet, whatever its list says so far.
        rollout("e", v3, Phase.RUNNING, ["s3"], T0 + timedelta(hours=4)),
    ])
    assert found == {
        "s1": Expected(v2, "b", T0 + timedelta(hours=1)),
        "s2": Expected(v2, "b", T0 + timedelta(hours=1)),
        "s3": Expected(v1, "a", T0),
    }
    assert expected_models([]) == {}


# --- out_of_step --------------------------------------------------------------------------------


EXPECTED = Expected(model("2.0.0"), "b", T0)
LATER = T0 + timedelta(seconds=5)


@pytest.mark.parametrize(("expected", "active", "last_seen", "in_rollout", "out"), [
    (EXPECTED, model("1.0.0"), LATER, False, True),
    (EXPECTED, None, LATER, False, True),  # it runs no model at all
    (EXPECTED, model("2.0.0"), LATER, False, False),
    # Same name and version, another build: only the sha256 says it is the promoted one.
    (EXPECTED, model("2.0.0", sha="f" * 64), LATER, False, True),
    (None, model("1.0.0"), LATER, False, False),  # no rollout promoted anything there
    (EXPECTED, model("1.0.0"), LATER, True, False),  # a running rollout is changing it
    (EXPECTED, model("1.0.0"), T0, False, False),  # a state from before the promotion ended
    (EXPECTED, model("1.0.0"), None, False, False),  # never seen online
])
def test_a_station_is_out_of_step_only_on_a_state_newer_than_its_promotion(
    expected: Expected | None, active: p.ModelRef | None, last_seen: datetime | None,
    in_rollout: bool, out: bool,
) -> None:
    assert out_of_step(expected, active, last_seen, in_rollout) is out


def test_the_realign_plan_promotes_on_the_station_alone() -> None:
    plan = realign_plan("press-07", model("2.0.0"), 45.0)
    assert plan.name == "realign press-07"
    assert len(plan.stages) == 1
    stage = plan.stages[0]
    assert (stage.mode, stage.approval, plan.command_timeout_s) == ("promote", False, 45.0)
    assert stage.stations.model_dump() == {"names": ["press-07"]}
    longest = "s" * 64  # the longest station id still makes a valid plan
    assert realign_plan(longest, model("2.0.0"), 60.0).stages[0].stations.model_dump() == {
        "names": [longest]}


# --- the controller's realign, through the API --------------------------------------------------


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    built = unstarted_controller(tmp_path)
    try:
        yield built
    finally:
        built.store.close()


@pytest.fixture
def client(controller: Controller) -> FlaskClient:
    return create_app(controller).test_client()


V2_REF = model("2.0.0", sha=sha256_file(V2 / MANIFEST_FILE))
V1_REF = model("1.0.0", sha=sha256_file(V1 / MANIFEST_FILE))


def report(controller: Controller, station: str, active: p.ModelRef | None,
           online: bool = True) -> None:
    controller.store.record_state(
        p.StationState(station=station, seq=1, online=online, active=active),
        datetime.now(UTC),
    )


def promote_earlier(controller: Controller, stations: list[str], ref: p.ModelRef = V2_REF) -> str:
    state = rollout("r-earlier", ref, Phase.PROMOTED, stations,
                    datetime.now(UTC) - timedelta(hours=1))
    controller.store.save_rollout(state.rollout_id, state.phase.value, state.model_dump_json(),
                                  state.updated)
    return state.rollout_id


def realign(client: FlaskClient, station: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    answer = client.post(f"/api/stations/{station}/realign", json={"by": "unit"}, **kwargs)
    return answer.status_code, answer.get_json()


def test_the_station_list_says_what_each_station_should_run(
    controller: Controller, client: FlaskClient
) -> None:
    promote_earlier(controller, ["s1", "s2"])
    report(controller, "s1", V1_REF)  # restored: out of step
    report(controller, "s2", V2_REF)
    report(controller, "s3", V1_REF)  # never promoted by a rollout
    listed = {s["station"]: s for s in client.get("/api/stations").get_json()["stations"]}
    assert listed["s1"]["out_of_step"] is True
    assert listed["s1"]["expected_active"] == V2_REF.model_dump(mode="json")
    assert listed["s2"]["out_of_step"] is False
    assert listed["s2"]["expected_active"] == V2_REF.model_dump(mode="json")
    assert listed["s3"]["out_of_step"] is False and listed["s3"]["expected_active"] is None
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'linesight_fleet_station_out_of_step{station="s1"} 1.0' in metrics
    assert 'linesight_fleet_station_out_of_step{station="s2"} 0.0' in metrics


def test_realign_starts_a_promote_only_rollout_of_the_promoted_bundle(
    controller: Controller, client: FlaskClient
) -> None:
    promote_earlier(controller, ["s1"])
    report(controller, "s1", V1_REF)
    status, answer = realign(client, "s1")
    assert status == 201, answer
    assert answer["plan"] == "realign s1"
    assert answer["candidate"] == {"name": NAME, "version": "2.0.0"} | {
        "sha256": V2_REF.sha256}
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING
    assert controller.rollout.plan.stages[0].stations.model_dump() == {"names": ["s1"]}
    status, answer = realign(client, "s1")  # a second request meets the running rollout
    assert (status, answer["error"]) == (409, f"rollout {controller.rollout.rollout_id} is "
                                               "still running")


@pytest.mark.parametrize(("setup", "station", "status", "error"), [
    ("none", "s9", 404, "no station 's9' has reported to this controller"),
    ("unpromoted", "s1", 409, "no promoted rollout made a model active on s1: there is "
     "nothing to bring it back to"),
    ("in_step", "s1", 409, "s1 runs part-classifier 2.0.0 already"),
    ("offline", "s1", 409, "s1 is offline: it can take the model once it is back"),
    ("rebuilt", "s1", 409, "bundle part-classifier 2.0.0 holds another manifest now"),
])
def test_realign_refuses_what_it_cannot_do_and_says_why(
    controller: Controller, client: FlaskClient, setup: str, station: str, status: int,
    error: str,
) -> None:
    if setup != "unpromoted":
        promote_earlier(controller, ["s1"], model("2.0.0", "e" * 64) if setup == "rebuilt"
                        else V2_REF)
    if setup != "none":
        active = V2_REF if setup == "in_step" else V1_REF
        report(controller, "s1", active, online=setup != "offline")
    got, answer = realign(client, station)
    assert got == status
    assert str(answer["error"]).startswith(error), answer
    assert controller.rollout is None, "nothing was started"


def test_realign_needs_the_token_and_a_json_body(tmp_path: Path) -> None:
    guarded = unstarted_controller(tmp_path, api_token="t" * 32)
    try:
        promote_earlier(guarded, ["s1"])
        report(guarded, "s1", V1_REF)
        client = create_app(guarded).test_client()
        assert realign(client, "s1")[0] == 401
        token = {"Authorization": "Bearer " + "t" * 32}
        form = client.post("/api/stations/s1/realign", data={"by": "x"}, headers=token)
        assert form.status_code == 415, "a form post (what a web page can send) is refused"
        assert guarded.rollout is None
        assert realign(client, "s1", headers=token)[0] == 201
    finally:
        guarded.store.close()
