"""The controller driven by a script (a plant's MES, a CI pipeline): a start sent again after a
timeout, and `status --json` read by a program. A real controller over the shipped bundles, a
real mosquitto; no station joins, so a rollout whose stage names one rolls back at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.client import ControllerClient, ControllerError
from deploy.controller import Controller
from linesight.broker import Broker
from linesight.cli import EXIT_NOT_DONE, main
from tests.support import V2, served_controller, wait_for

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

# Its station never joins the fleet: the rollout ends (rolled back) on the controller's first
# tick, as a short rollout (a promotion of one station, a stage the gate fails) ends quickly.
ENDS_AT_ONCE = """
name: shadow on press-09
stages:
  - name: shadow on press-09
    stations: [press-09]
    mode: shadow
    exit: {min_parts: 150, min_labelled_disagreements: 12, max_duration_s: 300}
  - name: promote press-09
    stations: [press-09]
    mode: promote
"""
CANDIDATE = {"name": "part-classifier", "version": "2.0.0"}
ENDED = ("promoted", "rolled_back", "aborted")


@pytest.fixture
def served(tmp_path: Path, broker: Broker) -> Iterator[tuple[Controller, ControllerClient]]:
    with served_controller(tmp_path, broker.url) as running:
        yield running


def current(client: ControllerClient) -> dict[str, Any]:
    doc = client.current()
    assert doc is not None
    return doc


def rollout_ids(client: ControllerClient) -> list[str]:
    return [entry["rollout_id"] for entry in client.get("/api/rollouts")["rollouts"]]


def test_a_start_sent_again_after_its_rollout_ended_starts_nothing(
    served: tuple[Controller, ControllerClient],
) -> None:
    """A script's start times out, so it sends the same request again; meanwhile the rollout
    the first one started has already ended. Naming the rollout it meant to follow (`after`:
    none had run) the request starts nothing the second time, and says which rollout did."""
    _, client = served
    request = {"plan_yaml": ENDS_AT_ONCE, "candidate": CANDIDATE, "by": "mes", "after": None}
    first = client.post("/api/rollouts", request)["rollout_id"]
    wait_for(lambda: current(client)["phase"] in ENDED, 30, "the first rollout ended")
    with pytest.raises(ControllerError) as refused:
        client.post("/api/rollouts", request)  # the same request, again
    assert refused.value.status == 409
    assert f"rollout {first} started" in str(refused.value), refused.value
    assert rollout_ids(client) == [first]
    # Meant to follow the first, a start goes through.
    second = client.post("/api/rollouts", {**request, "after": first})["rollout_id"]
    assert rollout_ids(client) == [second, first]


@pytest.mark.parametrize("after", [5, True, ["r-1"], {"id": "r-1"}])
def test_an_after_that_is_not_a_rollout_id_is_a_bad_request(
    served: tuple[Controller, ControllerClient], after: object
) -> None:
    _, client = served
    with pytest.raises(ControllerError) as refused:
        client.post("/api/rollouts", {"plan_yaml": ENDS_AT_ONCE, "candidate": CANDIDATE,
                                      "after": after})
    assert refused.value.status == 400 and "after:" in str(refused.value), refused.value
    assert rollout_ids(client) == []


@pytest.mark.parametrize(("path", "body", "named"), [
    ("/api/rollouts", {"plan_yaml": ENDS_AT_ONCE, "candidate": CANDIDATE, "afetr": None},
     "'afetr'"),
    ("/api/rollouts", {"plan_yaml": ENDS_AT_ONCE, "candidate": {**CANDIDATE, "sha": "x"}},
     "candidate: unknown key 'sha'"),
    ("/api/rollouts/current/pause", {"by": "mes", "stage": 0}, "'stage'"),
    ("/api/realign", {"stations": ["press-09"], "dry_run": True}, "'dry_run'"),
])
def test_a_key_the_request_does_not_take_is_refused_not_ignored(
    served: tuple[Controller, ControllerClient], path: str, body: dict[str, Any], named: str,
) -> None:
    """A misspelt `after` ignored would start a rollout the script meant to guard; a key no
    request takes is a 400 naming it, and nothing happens."""
    _, client = served
    with pytest.raises(ControllerError) as refused:
        client.post(path, body)
    assert refused.value.status == 400, refused.value
    assert named in str(refused.value) and "this request takes" in str(refused.value)
    assert rollout_ids(client) == []


def test_the_cli_start_run_again_with_after_starts_nothing(
    served: tuple[Controller, ControllerClient], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`rollout start --after` the id a script read before starting: running the same command
    again (after exit status 3, or a job retried) cannot start a second rollout."""
    _, client = served
    plan = tmp_path / "plan.yaml"
    plan.write_text(ENDS_AT_ONCE, encoding="utf-8")
    command = ["fleet", "rollout", "start", str(plan), "--candidate", "part-classifier:2.0.0",
               "--after", "none", "--controller", client.url]
    assert main(command) == 0
    first = current(client)["rollout_id"]
    wait_for(lambda: current(client)["phase"] in ENDED, 30, "the first rollout ended")
    capsys.readouterr()
    assert main(command) == EXIT_NOT_DONE
    err = capsys.readouterr().err
    assert "controller answered 409" in err and f"rollout {first} started" in err, err
    assert rollout_ids(client) == [first]
    assert main([*command[:-4], "--after", first, "--controller", client.url]) == 0
    assert len(rollout_ids(client)) == 2


def test_status_json_without_a_rollout_prints_json(
    served: tuple[Controller, ControllerClient], capsys: pytest.CaptureFixture[str],
) -> None:
    """A script parses what `status --json` prints: with no rollout yet too."""
    _, client = served
    assert main(["fleet", "rollout", "status", "--json", "--controller", client.url]) == 0
    assert json.loads(capsys.readouterr().out) is None


def test_status_json_watch_prints_one_document_a_line(
    tmp_path: Path, broker: Broker, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`status --json --watch` is read line by line (JSON Lines): every line a document."""
    # Its first tick a minute away, the rollout runs until the supervisor aborts it.
    with served_controller(tmp_path, broker.url, tick_s=60) as (_, client):
        client.start_rollout(ENDS_AT_ONCE, "part-classifier", "2.0.0")
        watch_and_abort(client, monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    documents = [json.loads(line) for line in lines]
    assert [doc["phase"] for doc in documents] == ["running", "aborted"], lines


def watch_and_abort(client: ControllerClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status --json --watch`, the rollout aborted while it waits to look again."""
    aborted: list[str] = []

    def abort_while_watching(seconds: float) -> None:
        if not aborted:  # the first refresh finds the rollout ended
            aborted.append(client.act("abort", by="mes", reason="shift change")["phase"])

    monkeypatch.setattr("time.sleep", abort_while_watching)
    status = main(["fleet", "rollout", "status", "--json", "--watch", "--controller",
                   client.url])
    assert status == 0 and aborted == ["aborted"], aborted
