"""The controller's HTTP API answers every bad request with a 4xx that says what is wrong, never
with a 500, and touches no file for a candidate name or version no bundle can have. A
controller over a copy of the shipped bundles, built but never started (no broker, no threads),
behind Flask's test client."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from deploy.api import create_app
from deploy.controller import Controller
from linesight.artifacts import SIGNATURE_FILE
from tests.support import V2, unstarted_controller

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

NAME, VERSION = "part-classifier", "2.0.0"
PLAN_LIMIT, BODY_LIMIT = 64 * 1024, 1024 * 1024  # docs/controller.md, HTTP API
CANDIDATE = {"name": NAME, "version": VERSION}
PLAN = """
name: api-test
stages:
  - name: shadow on s1
    stations: [s1]
    mode: shadow
    exit: {min_parts: 150, min_labelled_disagreements: 12, max_duration_s: 300}
  - name: promote
    stations: [s1]
    mode: promote
"""


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


def start(client: FlaskClient, plan_yaml: Any = PLAN, candidate: Any = None) -> tuple[int, str]:
    answer = client.post("/api/rollouts", json={
        "plan_yaml": plan_yaml, "candidate": CANDIDATE if candidate is None else candidate,
    })
    return answer.status_code, answer.get_json()["error"] if answer.status_code >= 400 else ""


# --- the plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("plan_yaml", "said"), [
    ("[" * 5000 + "]" * 5000, "plan_yaml: nested too deeply"),  # RecursionError in PyYAML
    (PLAN.replace("min_parts: 150", "min_parts: 1" + "0" * 5000),  # int conversion limit
     "plan_yaml: a value cannot be read: ValueError: Exceeds the limit (4300 digits)"),
    (PLAN.replace("name: api-test", "name: !!timestamp x"),  # AttributeError in PyYAML
     "plan_yaml: a value cannot be read"),
    (PLAN.replace("name: api-test", "name: 2025-13-45"), "month must be in 1..12"),
    (PLAN + "#" * PLAN_LIMIT, f"plan_yaml: longer than {PLAN_LIMIT} characters"),
    ("{[1, 2]: 3}", "plan_yaml is not valid YAML"),
], ids=["deep", "long-int", "timestamp", "date", "too-long", "unhashable-key"])
def test_a_plan_that_cannot_be_read_is_a_bad_request(
    client: FlaskClient, controller: Controller, plan_yaml: Any, said: str
) -> None:
    status, error = start(client, plan_yaml)
    assert status == 400 and said in error, (status, error)
    assert controller.rollout is None


def test_a_plan_whose_command_timeout_outlasts_the_command_ttl_is_a_bad_request(
    client: FlaskClient, controller: Controller
) -> None:
    # A station refuses a command once it has expired: its ack could never come in time.
    plan = f"command_timeout_s: {controller.config.command_ttl_s + 1:g}\n" + PLAN
    status, error = start(client, plan)
    assert status == 400 and "command_ttl_s" in error, (status, error)
    assert controller.rollout is None
    assert start(client, f"command_timeout_s: {controller.config.command_ttl_s:g}\n" + PLAN
                 )[0] == 201


# --- the candidate ----------------------------------------------------------------------------


@pytest.mark.parametrize(("candidate", "said"), [
    ({"name": "a" * 5000, "version": VERSION}, "candidate name 'aaaaaaaaaaaa...aaaaaaaaaaaaa'"),
    ({"name": NAME, "version": "1.0." + "1" * 5000}, "candidate version"),
    ({"name": f"../bundles/{NAME}", "version": VERSION}, "candidate name"),
    ({"name": "a\x00b", "version": VERSION}, "candidate name"),
    ({"name": NAME.upper(), "version": VERSION}, "candidate name"),
    ({"name": NAME, "version": f"{VERSION}\n"}, "candidate version"),
    ({"name": NAME, "version": "2.0"}, "candidate version"),
    ({"name": [NAME], "version": VERSION}, "candidate: give"),
], ids=["long-name", "long-version", "dot-dot", "nul", "upper", "newline", "short-version",
        "list"])
def test_a_candidate_no_bundle_can_be_is_a_bad_request(
    client: FlaskClient, controller: Controller, candidate: Any, said: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before its name or version becomes a path: no file is looked at."""
    def no_file(*_args: object) -> None:
        raise AssertionError("a file was looked at")

    monkeypatch.setattr("deploy.controller.verify_bundle", no_file)
    status, error = start(client, candidate=candidate)
    assert status == 400 and said in error, (status, error)
    assert controller.rollout is None


def test_a_bundle_whose_signature_is_not_text_is_refused(
    client: FlaskClient, controller: Controller
) -> None:
    (controller.config.bundles / NAME / VERSION / SIGNATURE_FILE).write_bytes(b"\xff\xfe\x00")
    status, error = start(client)
    assert status == 409, (status, error)
    # Refused before anything is sent: as unreadable text, or as a signature that is no base64.
    assert error.startswith(f"bundle {NAME} {VERSION} refused: "), error


def test_a_bundle_filed_under_another_version_is_refused(
    client: FlaskClient, controller: Controller
) -> None:
    """Stations keep a bundle by its manifest's name and version; the folder must say the same."""
    shutil.copytree(controller.config.bundles / NAME / VERSION,
                    controller.config.bundles / NAME / "9.9.9")
    status, error = start(client, candidate={"name": NAME, "version": "9.9.9"})
    assert status == 409 and f"its manifest says {NAME} {VERSION}" in error, (status, error)
    assert controller.rollout is None


def test_a_bundle_without_its_signature_is_refused_when_no_key_checks_it(tmp_path: Path) -> None:
    """Without `key` the controller does not verify the signature, but stations need it."""
    unsigned = unstarted_controller(tmp_path, signed=False)
    try:
        (unsigned.config.bundles / NAME / VERSION / SIGNATURE_FILE).unlink()
        status, error = start(create_app(unsigned).test_client())
        assert status == 409, (status, error)
        assert "refused: it cannot be read: " in error and SIGNATURE_FILE in error, error
    finally:
        unsigned.store.close()


# --- the request body -------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "said"), [
    ('{"plan_yaml": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nested too deeply"),
    ('{"plan_yaml": 1' + "0" * 5000 + "}", 400, "not valid JSON"),
    (b'{"by": "\xff"}', 400, "not valid JSON"),
    ("{'by': 'qe'}", 400, "not valid JSON"),
    # Python keeps the last of two equal keys, a proxy's log or another reader the first.
    ('{"by": "alice", "by": "mallory"}', 400, "the key 'by' appears twice in one object"),
    ('{"by": "' + "x" * BODY_LIMIT + '"}', 413, f"larger than {BODY_LIMIT} bytes"),
], ids=["deep", "long-int", "not-utf8", "not-json", "duplicate-key", "too-large"])
@pytest.mark.parametrize("path", ["/api/rollouts", "/api/rollouts/current/pause"])
def test_a_body_that_cannot_be_read_is_a_bad_request(
    client: FlaskClient, path: str, body: str | bytes, status: int, said: str
) -> None:
    answer = client.post(path, data=body, content_type="application/json")
    assert answer.status_code == status and said in answer.get_json()["error"], (
        answer.status_code, answer.get_data(as_text=True)[:300])


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_a_post_that_is_not_json_changes_nothing(
    client: FlaskClient, controller: Controller, content_type: str | None
) -> None:
    """What a page on another site can make a browser send without asking first (a form, a
    text/plain or empty fetch) is refused: without an API token it would pause or abort."""
    assert start(client)[0] == 201
    answer = client.post("/api/rollouts/current/pause", data="by=mallory",
                         content_type=content_type)
    assert answer.status_code == 415, answer.get_json()
    assert controller.rollout is not None and controller.rollout.phase.value == "running"


@pytest.mark.parametrize(("body", "said"), [
    ({"by": ["qe"]}, "by: a string is expected"),
    ({"by": "qe", "reason": 12}, "reason: a string is expected"),
    ({"by": "\ud800"}, "by: not valid Unicode text"),
    ({"by": "qe", "reason": "bad \udfff"}, "reason: not valid Unicode text"),
], ids=["by-list", "reason-number", "by-surrogate", "reason-surrogate"])
def test_who_and_why_must_be_text(
    client: FlaskClient, controller: Controller, body: dict[str, Any], said: str
) -> None:
    assert start(client)[0] == 201
    answer = client.post("/api/rollouts/current/pause", json=body)
    assert answer.status_code == 400 and said in answer.get_json()["error"], answer.get_json()
    assert controller.rollout is not None and controller.rollout.phase.value == "running"
    paused = client.post("/api/rollouts/current/pause", json={"by": "qe", "reason": "ok"})
    assert paused.status_code == 200 and paused.get_json()["phase_detail"] == "paused"


# --- the bundle server ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    f"{'a' * 5000}/{VERSION}/model.onnx", f"{NAME}/{VERSION}/{'b' * 300}",
    f"{NAME}/{VERSION}/model.onnx%00",
], ids=["long-name", "long-file-name", "nul"])
def test_a_bundle_file_no_file_can_have_is_not_found(client: FlaskClient, path: str) -> None:
    assert client.get(f"/bundles/{path}").status_code == 404
    with client.get(f"/bundles/{NAME}/{VERSION}/model.onnx") as served:
        assert served.status_code == 200


@pytest.mark.parametrize(("method", "path", "code"), [
    ("get", "/api/rollouts/current/pause", 405),  # an action is a POST
    ("post", "/api/stations", 405),
    ("get", "/api/no-such-thing", 404),
    ("get", "/api/rollouts/a/b/c", 404),
    ("get", "/api", 404),  # the API's own root, as a script probing for it asks
    ("get", "/api/", 404),
])
def test_an_api_path_or_method_that_does_not_exist_answers_in_json(
    client: FlaskClient, method: str, path: str, code: int
) -> None:
    answer = getattr(client, method)(path)
    assert answer.status_code == code
    assert answer.is_json and answer.get_json()["error"], answer.get_data()[:100]


@pytest.mark.parametrize(("by", "said"), [("alice", " by alice"), (None, " by api")])
def test_who_started_a_rollout_is_in_its_history(
    controller: Controller, client: FlaskClient, by: str | None, said: str
) -> None:
    body: dict[str, Any] = {"plan_yaml": PLAN, "candidate": CANDIDATE}
    if by is not None:
        body["by"] = by
    answer = client.post("/api/rollouts", json=body)
    assert answer.status_code == 201, answer.get_json()
    first = answer.get_json()["history"][0]
    assert first.endswith(f"started api-test for {NAME} {VERSION}{said}"), first


# --- text no JSON document can hold -----------------------------------------------------------


@pytest.mark.parametrize("plan_yaml", [
    PLAN.replace("name: api-test", 'name: api-test\ndescription: "\\udc00"'),
    PLAN.replace("stations: [s1]\n    mode: shadow",
                 'stations: {labels: {line: "\\ud800"}}\n    mode: shadow'),
], ids=["description", "label"])
def test_a_plan_with_a_lone_surrogate_is_a_bad_request(
    client: FlaskClient, controller: Controller, plan_yaml: str
) -> None:
    """A `\\ud800` escape in the plan's YAML cannot be stored with the rollout: a 400 naming
    the key, not a 500 once the rollout is saved."""
    status, error = start(client, plan_yaml)
    assert status == 400 and "not valid Unicode text" in error, (status, error)
    assert controller.rollout is None


# --- an action on a rollout that is not the current one ----------------------------------------


def test_an_action_on_an_earlier_rollout_says_which_one_is_current(
    client: FlaskClient, controller: Controller
) -> None:
    """Only the latest rollout can be acted on. An earlier one exists (its GET answers), so
    "no rollout" would be wrong: the 404 names the rollout that can be."""
    assert start(client)[0] == 201
    assert controller.rollout is not None
    first = controller.rollout.rollout_id
    assert client.post(f"/api/rollouts/{first}/abort", json={}).status_code == 200
    assert start(client)[0] == 201
    second = controller.rollout.rollout_id
    assert client.get(f"/api/rollouts/{first}").status_code == 200
    answer = client.post(f"/api/rollouts/{first}/rollback", json={})
    error = answer.get_json()["error"]
    assert answer.status_code == 404, (answer.status_code, error)
    assert first in error and second in error and "no rollout" not in error, error
    assert controller.rollout.rollout_id == second and controller.rollout.phase.value == "running"
    unknown = client.post("/api/rollouts/r-none/rollback", json={})
    assert unknown.status_code == 404 and "no rollout r-none" in unknown.get_json()["error"]
