"""Actions on a rollout through the controller's API, as people at a plant send them: an
approval naming the stage it is meant for, a late abort, the API token missing or wrong, and
the CLI against a controller that drops the connection after the request went out. A
controller over a copy of the shipped bundles, never started, behind Flask's test client; the
CLI against small HTTP servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import itertools
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from deploy.api import create_app
from deploy.controller import Controller
from deploy.fleet_store import FleetStoreError
from deploy.rollout import Phase
from linesight.cli import main
from tests.support import V2, answering_server, unstarted_controller

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

TOKEN = "t0k3n-" + "x" * 26
PLAN = """
name: api-actions
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
    built = unstarted_controller(tmp_path, api_token=TOKEN)
    try:
        yield built
    finally:
        built.store.close()


@pytest.fixture
def client(controller: Controller) -> FlaskClient:
    return create_app(controller).test_client()


def auth(token: str = TOKEN, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


def started(client: FlaskClient) -> str:
    answer = client.post("/api/rollouts", headers=auth(), json={
        "plan_yaml": PLAN, "candidate": {"name": "part-classifier", "version": "2.0.0"},
    })
    assert answer.status_code == 201, answer.get_json()
    rollout_id: str = answer.get_json()["rollout_id"]
    return rollout_id


def act(client: FlaskClient, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = client.post(f"/api/rollouts/current/{action}", headers=auth(), json=body)
    return answer.status_code, answer.get_json()


# --- an approval names its stage --------------------------------------------------------------


def test_an_approval_for_another_stage_is_refused_naming_both(
    client: FlaskClient, controller: Controller
) -> None:
    started(client)
    status, answer = act(client, "approve", {"by": "alice", "stage": 1})
    assert status == 409, answer
    assert answer["error"] == ("stage 2 'promote' is not waiting for approval: the rollout is "
                               "running at stage 1 'shadow on s1'"), answer
    status, answer = act(client, "approve", {"by": "alice"})
    assert status == 409
    assert answer["error"] == "nothing to approve: the rollout is running at stage 1 " \
        "'shadow on s1'", answer
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING


@pytest.mark.parametrize("stage", [True, -1, "0", 0.0, 1.5, [0], 10**6])
def test_a_stage_that_is_not_an_index_is_a_bad_request(
    client: FlaskClient, controller: Controller, stage: Any
) -> None:
    started(client)
    status, answer = act(client, "approve", {"by": "alice", "stage": stage})
    assert status == 400 and answer["error"].startswith("stage: "), (status, answer)


@pytest.mark.parametrize("key", ["by", "reason"])
@pytest.mark.parametrize("text", ["alice\n2026-11-28 INFO approved by bob", "a\rb", "a\x1b[2Jb",
                                  "a\x00b", "a\u0085b"])
def test_control_characters_in_who_or_why_are_refused(
    client: FlaskClient, controller: Controller, key: str, text: str
) -> None:
    """`by` and `reason` go into the rollout's history and the log: a line break or a terminal
    escape there could forge an entry, so they are refused, and nothing happens."""
    started(client)
    status, answer = act(client, "pause", {"by": "alice", "reason": "", key: text})
    assert status == 400, answer
    assert answer["error"].startswith(f"{key}: "), answer
    assert "control character" in answer["error"], answer
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING


def test_ordinary_text_in_who_and_why_is_taken(client: FlaskClient, controller: Controller) -> None:
    started(client)
    status, answer = act(client, "pause", {"by": "Zoë Müller (QA)", "reason": "check the lens\t2"})
    assert status == 200, answer
    assert any("paused by Zoë Müller (QA)" in line for line in answer["history"]), answer


# --- a late abort -----------------------------------------------------------------------------


def test_abort_of_a_promoted_rollout_is_refused_and_rollback_still_undoes_it(
    client: FlaskClient, controller: Controller
) -> None:
    started(client)
    assert controller.rollout is not None
    controller.rollout = controller.rollout.model_copy(update={"phase": Phase.PROMOTED})
    status, answer = act(client, "abort", {"by": "carol"})
    assert status == 409 and "use rollback" in answer["error"], answer
    assert controller.rollout.phase == Phase.PROMOTED
    status, answer = act(client, "rollback", {"by": "carol", "reason": "complaints"})
    assert status == 200, answer
    assert any("rollback requested by carol: complaints" in line for line in answer["history"])


# --- the API token ----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "said"), [
    ({}, "no API token was given"),
    (auth(""), "no API token was given"),
    (auth("wrong-" + "x" * 26), "the API token given is not this controller's api_token"),
    (auth(TOKEN[:-1]), "the API token given is not this controller's api_token"),
    ({"Authorization": TOKEN}, "no API token was given"),  # the scheme left out
    (auth(TOKEN, "Basic"), "no API token was given"),
], ids=["none", "empty", "wrong", "one-short", "no-scheme", "basic"])
def test_a_request_without_the_token_is_refused_saying_which(
    client: FlaskClient, controller: Controller, headers: dict[str, str], said: str
) -> None:
    started(client)
    answer = client.post("/api/rollouts/current/pause", headers=headers, json={"by": "x"})
    assert answer.status_code == 401 and said in answer.get_json()["error"], answer.get_json()
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_taken_in_any_case(
    client: FlaskClient, controller: Controller, scheme: str
) -> None:
    """HTTP authentication schemes are case-insensitive (RFC 9110, 11.1)."""
    started(client)
    answer = client.post("/api/rollouts/current/pause", headers=auth(TOKEN, scheme),
                         json={"by": "dave"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["history"][-1].endswith("paused by dave")


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """An HTTP server that answers every POST like the controller would if the action went
    through, keeping (path, body) of each."""
    seen: list[tuple[str, dict[str, Any]]] = []
    rollout = {"rollout_id": "r-1", "candidate": {"name": "m", "version": "2.0.0"},
               "plan": "p", "phase": "running", "phase_detail": "running", "stage": 1,
               "stages": [], "reason": ""}

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.path, json.loads(self.rfile.read(length))))
            body = json.dumps(rollout).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_the_cli_approves_the_stage_it_is_given(
    recording_server: tuple[str, list[tuple[str, dict[str, Any]]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--stage 2` is the number `status` shows: the API is sent its index, 1."""
    url, seen = recording_server
    assert main(["fleet", "rollout", "approve", "--stage", "2", "--by", "alice",
                 "--controller", url]) == 0
    assert seen == [("/api/rollouts/current/approve",
                     {"by": "alice", "reason": "", "stage": 1})], seen


@pytest.mark.parametrize("stage", ["0", "-1"])
def test_the_cli_refuses_a_stage_number_no_stage_has(
    capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    # Nothing listens at port 9: the number is refused before anything is asked.
    assert main(["fleet", "rollout", "approve", "--stage", stage,
                 "--controller", "http://127.0.0.1:9"]) == 2
    assert "--stage: the stage's number as 'linesight fleet rollout status' shows it" \
        in capsys.readouterr().err


@pytest.fixture
def hanging_up() -> Iterator[str]:
    """A server that reads the request and closes the connection without an answer: a
    controller killed or restarted while it handled the request."""
    with answering_server(itertools.repeat(None)) as url:
        yield url


@pytest.mark.parametrize("argv", [("rollout", "approve", "--stage", "1"),
                                  ("rollout", "abort"), ("realign", "st-1")])
def test_a_request_cut_off_unanswered_may_still_happen(
    hanging_up: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """The request went out: the controller may have carried it out before it went away.
    "No controller is running, start one" would have the supervisor send it again."""
    status = main(["fleet", *argv, "--controller", hanging_up])
    err = capsys.readouterr().err
    assert status == 3  # not 2: that says it was not done
    assert "no controller is running" not in err, err
    assert f"the controller at {hanging_up} closed the connection without answering" in err
    assert "what was asked may still happen" in err and "linesight fleet rollout status" in err


def test_a_read_cut_off_says_to_try_again(
    hanging_up: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fleet", "rollout", "status", "--controller", hanging_up]) == 2
    err = capsys.readouterr().err
    assert f"the controller at {hanging_up} closed the connection without answering" in err
    assert "try again" in err and "may still happen" not in err, err


def test_the_cli_says_how_to_give_the_token(
    capsys: pytest.CaptureFixture[str], controller: Controller
) -> None:
    """The controller's own 401 through the CLI: which is missing, and where it goes."""
    from linesight.http_server import HttpServer

    server = HttpServer(create_app(controller), "127.0.0.1", 0)
    server.start()
    try:
        assert main(["fleet", "rollout", "pause", "--controller", server.url]) == 2
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "controller answered 401: no API token was given" in err, err
    assert "--token or $LINESIGHT_API_TOKEN" in err, err


# --- the store failing ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"),
                                   FleetStoreError("fleet.db is closed")])
def test_an_action_the_store_cannot_save_is_a_503_that_says_nothing_changed(
    client: FlaskClient, controller: Controller, monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    """The rollout's state is saved before anything else happens: when the save fails, the
    action did not happen, and the answer must say so (and why), not a bare 500."""
    started(client)

    def failing(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr(controller.store, "save_rollout", failing)
    status, answer = act(client, "pause", {"by": "erin"})
    assert status == 503, (status, answer)
    assert answer["error"] == ("the rollout's new state could not be saved, so nothing "
                               f"changed: {error}; try again"), answer
    assert controller.rollout is not None and controller.rollout.phase == Phase.RUNNING
