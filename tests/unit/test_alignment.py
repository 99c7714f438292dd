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
    plan = parse_plan({"name": "p", "promote_without_evidence": True,
                       "stages": [{"name": "all", "stations": "all", "mode": "promote"}]})
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


def test_the_realign_plan_promotes_on_the_stations_alone() -> None:
    plan = realign_plan(["press-07", "press-09"], model("2.0.0"), 45.0)
    assert plan.name == "realign press-07, press-09"
    assert len(plan.stages) == 1
    stage = plan.stages[0]
    assert (stage.mode, stage.approval, plan.command_timeout_s) == ("promote", False, 45.0)
    assert stage.stations.model_dump() == {"names": ["press-07", "press-09"]}
    # Names that do not fit a plan's name are counted instead; the stage still names them all.
    longest = ["s" * 64]
    assert realign_plan(longest, model("2.0.0"), 60.0).name == "realign " + "s" * 64
    many = [f"station-{n:03d}" for n in range(40)]
    crowded = realign_plan(many, model("2.0.0"), 60.0)
    assert (crowded.name, crowded.stages[0].name) == ("realign 40 stations",
                                                      "promote on 40 stations")
    assert crowded.stages[0].stations.model_dump() == {"names": many}


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


def realign(client: FlaskClient, *stations: str, **kwargs: object) -> tuple[int, dict[str, object]]:
    answer = client.post("/api/realign", json={"stations": list(stations), "by": "unit"},
                         **kwargs)
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
    assert controller.rollout.history[0].endswith("started realign s1 for part-classifier "
                                                  "2.0.0 by unit")
    status, answer = realign(client, "s1")  # a second request meets the running rollout
    assert (status, answer["error"]) == (409, f"rollout {controller.rollout.rollout_id} is "
                                               "still running")


def test_realign_takes_several_stations_promoted_to_one_model(
    controller: Controller, client: FlaskClient
) -> None:
    promote_earlier(controller, ["s1", "s2", "s3"])
    for station in ("s1", "s2", "s3"):
        report(controller, station, V1_REF)
    status, answer = realign(client, "s3", "s1", "s3")
    assert status == 201, answer
    assert answer["plan"] == "realign s3, s1", "each station once, in the order given"
    assert controller.rollout is not None
    assert controller.rollout.plan.stages[0].stations.model_dump() == {"names": ["s3", "s1"]}


def test_stations_promoted_to_different_models_are_realigned_one_model_at_a_time(
    controller: Controller, client: FlaskClient
) -> None:
    promote_earlier(controller, ["s1", "s2"])
    later = rollout("r-later", model("3.0.0"), Phase.PROMOTED, ["s2"], datetime.now(UTC)
                    - timedelta(minutes=30))
    controller.store.save_rollout(later.rollout_id, later.phase.value, later.model_dump_json(),
                                  later.updated)
    report(controller, "s1", V1_REF)
    report(controller, "s2", V1_REF)
    status, answer = realign(client, "s1", "s2")
    assert (status, answer["error"]) == (
        409, "these stations were promoted to different models (s1: part-classifier 2.0.0; "
        "s2: part-classifier 3.0.0): realign them one model at a time")
    assert controller.rollout is None


@pytest.mark.parametrize(("body", "said"), [
    ({}, "stations: give a list of 1 to 1000 station ids"),
    ({"stations": []}, "stations: give a list of 1 to 1000 station ids"),
    ({"stations": "s1"}, "stations: give a list of 1 to 1000 station ids"),
    ({"stations": [1]}, "stations: give a list of 1 to 1000 station ids"),
    ({"stations": ["s"] * 1001}, "stations: give a list of 1 to 1000 station ids"),
    ({"stations": ["a/b"]}, "stations: 'a/b' is not a station id"),
    ({"stations": ["s1"], "by": 5}, "by: a string is expected"),
])
def test_a_realign_request_that_cannot_be_read_is_a_bad_request(
    controller: Controller, client: FlaskClient, body: dict[str, object], said: str
) -> None:
    answer = client.post("/api/realign", json=body)
    assert (answer.status_code, answer.get_json()["error"]) == (400, said)
    assert controller.rollout is None


@pytest.mark.parametrize(("setup", "station", "status", "error"), [
    ("none", "s9", 404, "no station 's9' has reported to this controller"),
    ("in_step", "s9", 404, "no station 's9' has reported to this controller"),
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
        form = client.post("/api/realign", data={"stations": "s1"}, headers=token)
        assert form.status_code == 415, "a form post (what a web page can send) is refused"
        assert guarded.rollout is None
        assert realign(client, "s1", headers=token)[0] == 201
    finally:
        guarded.store.close()


def test_realign_all_leaves_the_offline_stations_out_and_says_so(
    controller: Controller, capsys: pytest.CaptureFixture[str]
) -> None:
    from linesight.cli import main
    from linesight.http_server import HttpServer

    promote_earlier(controller, ["s1", "s2", "s3"])
    for station in ("s1", "s2"):  # restored, seen, and off the network again
        report(controller, station, V1_REF)
        report(controller, station, V1_REF, online=False)
    report(controller, "s3", V2_REF)
    server = HttpServer(create_app(controller), "127.0.0.1", 0).start()
    realign_all = ["fleet", "realign", "--all", "--by", "unit", "--controller", server.url]
    try:
        assert main(realign_all) == 2
        _, err = capsys.readouterr()
        assert "offline, realign once back: s1 s2" in err
        assert "every station out of step is offline: realign them once they are back" in err
        assert controller.rollout is None

        report(controller, "s1", V1_REF)  # back online
        status = main(realign_all)
        out, err = capsys.readouterr()
        assert status == 0, err
        assert "plan realign s1" in out
        assert "offline, realign once back: s2" in err
        assert controller.rollout is not None
        assert controller.rollout.plan.stages[0].stations.model_dump() == {"names": ["s1"]}
    finally:
        server.stop()
