"""The operator's verdict, the fleet's ground truth, checked field by field and fault by fault:
nothing recorded wrongly, nothing lost or recorded twice, and the operator always told."""

from __future__ import annotations

import html
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge_agent.store import StationStore
from linesight.protocol import PART_ID_MAX_LENGTH
from tests.unit.test_station_ui import (
    _HASHES,
    OPERATOR_PIN,
    SUPERVISOR_PIN,
    FakeClock,
    add_part,
    csrf_of,
    make_app,
    sign_in,
    status_doc,
)
from tests.unit.test_store import VERDICT_TOPIC, verdict_message

JSON = {"Accept": "application/json"}
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = StationStore(tmp_path / "data", busy_timeout_s=0.1)
    opened.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    opened.upsert_operator("op-8", "Ben Operator", "operator", _HASHES[OPERATOR_PIN])
    opened.upsert_operator("sup-1", "Sam Supervisor", "supervisor", _HASHES[SUPERVISOR_PIN])
    yield opened
    opened.close()


@pytest.fixture
def app(store: StationStore) -> Flask:
    app = make_app(store, FakeClock())
    app.config["TESTING"] = False  # answer errors as the served screen does, not raise them
    return app


def post_verdict(client: FlaskClient, token: str, form: dict[str, Any]) -> Any:
    return client.post("/verdict", data=form, headers={**JSON, "X-CSRF-Token": token})


def verdicts(store: StationStore) -> list[tuple[str, str, str, str | None]]:
    return [(v.part_id, v.operator, v.outcome, v.label) for v in store.verdicts_since(EPOCH)]


# --- each field of the verdict form -------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "named"),
    [
        ({"outcome": "pass"}, "the form names no part"),
        ({"part_id": "", "outcome": "pass"}, "the form names no part"),
        (
            {"part_id": "P" * (PART_ID_MAX_LENGTH + 1), "outcome": "pass"},
            f"a part id is at most {PART_ID_MAX_LENGTH} characters",
        ),
        ({"part_id": "P-1"}, "no verdict given. Choose Pass, Reject or Unsure."),
        ({"part_id": "P-1", "outcome": ""}, "no verdict given"),
        ({"part_id": "P-1", "outcome": "PASS"}, "'PASS' is not a verdict"),
        ({"part_id": "P-1", "outcome": "ok"}, "'ok' is not a verdict"),
        ({"part_id": "P-1", "outcome": "pass" * 5000}, "'passpasspasspass...' is not a verdict"),
    ],
)
def test_a_verdict_form_missing_or_wrong_field_is_refused_and_names_it(
    app: Flask, store: StationStore, form: dict[str, Any], named: str
) -> None:
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    answer = post_verdict(client, token, form)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error.startswith("Not recorded: ") and named in error, error
    assert len(error) < 200, "a value sent is echoed cut short"
    page = client.post("/verdict", data={**form, "csrf_token": token})
    assert page.status_code == 400
    assert named in html.unescape(page.get_data(as_text=True))
    assert verdicts(store) == []


@pytest.mark.parametrize(
    ("form", "named"),
    [
        ({"outcome": "pass"}, "the form names no part"),
        ({"part_id": "P-1"}, "no final verdict given. Choose Pass or Reject."),
        ({"part_id": "P-1", "outcome": "escalate"}, "'escalate' is not a final verdict"),
    ],
)
def test_a_final_verdict_form_missing_or_wrong_field_is_refused_and_names_it(
    app: Flask, store: StationStore, form: dict[str, Any], named: str
) -> None:
    add_part(store, "P-1")
    store.record_verdict("P-1", "op-7", "escalate", None, datetime.now(UTC))
    client = app.test_client()
    token = sign_in(client, "sup-1", SUPERVISOR_PIN)
    page = client.post("/supervisor/resolve", data={**form, "csrf_token": token})
    assert page.status_code == 400
    assert named in html.unescape(page.get_data(as_text=True))
    assert store.escalation_count() == 1


def test_a_verdict_for_a_part_never_queued_is_refused(app: Flask, store: StationStore) -> None:
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    answer = post_verdict(client, token, {"part_id": "P-2", "outcome": "reject"})
    assert answer.status_code == 404
    assert "not in the review queue" in answer.get_json()["error"]
    assert verdicts(store) == []


def test_a_label_sent_with_the_form_is_not_what_is_recorded(
    app: Flask, store: StationStore
) -> None:
    """The label is the running model's word for the outcome, never one the browser names."""
    store.save_status(status_doc(model_labels={"ok": "good", "defect": "ng"}))
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    form = {"part_id": "P-1", "outcome": "pass", "label": "scratch"}
    assert post_verdict(client, token, form).get_json()["result"] == "recorded"
    assert verdicts(store) == [("P-1", "op-7", "pass", "good")]


def test_a_part_judged_and_pruned_meanwhile_is_refused_not_recorded_again(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1", age_s=3600)
    client = app.test_client()
    token = sign_in(client)
    store.record_verdict("P-1", "op-8", "reject", "defect", datetime.now(UTC))
    store.publish_verdicts(lambda row: VERDICT_TOPIC, verdict_message)
    assert store.prune_confirmed(timedelta(seconds=60)) == 1
    answer = post_verdict(client, token, {"part_id": "P-1", "outcome": "pass"})
    assert answer.status_code == 404
    assert "not in the review queue" in answer.get_json()["error"]
    assert store.verdicts_since(EPOCH) == []  # the earlier verdict went with the part


# --- never lost, never twice --------------------------------------------------------------------


def test_two_operators_on_two_screens_the_first_counts_the_second_is_told(
    store: StationStore,
) -> None:
    add_part(store, "P-1")
    # Two screens: two UI processes on one data dir, each with its own store connection.
    other = StationStore(store.data_dir, busy_timeout_s=0.1)
    try:
        ana, ben = make_app(store, FakeClock()).test_client(), make_app(
            other, FakeClock()
        ).test_client()
        ana_token, ben_token = sign_in(ana), sign_in(ben, "op-8")
        first = post_verdict(ana, ana_token, {"part_id": "P-1", "outcome": "reject"})
        second = post_verdict(ben, ben_token, {"part_id": "P-1", "outcome": "pass"})
    finally:
        other.close()
    assert first.get_json()["result"] == "recorded"
    assert second.status_code == 200 and second.get_json()["result"] == "already_judged"
    assert verdicts(store) == [("P-1", "op-7", "reject", "defect")]
    assert [v.outcome for v in store.unpublished_verdicts()] == ["reject"]


def test_a_verdict_the_full_disk_refuses_says_not_recorded_and_a_retry_records_it(
    app: Flask, store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    real = store.record_verdict

    def disk_full(*args: Any, **kwargs: Any) -> bool:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "record_verdict", disk_full)
    answer = post_verdict(client, token, {"part_id": "P-1", "outcome": "reject"})
    assert answer.status_code == 503
    error = answer.get_json()["error"]
    assert "Not recorded" in error and "disk is full" in error and "Nothing was saved" in error
    monkeypatch.setattr(store, "record_verdict", real)
    assert store.review_count() == 1
    again = post_verdict(client, token, {"part_id": "P-1", "outcome": "reject"})
    assert again.get_json()["result"] == "recorded"
    assert verdicts(store) == [("P-1", "op-7", "reject", "defect")]


# --- who may do what ----------------------------------------------------------------------------


def test_an_operator_cannot_give_a_supervisors_final_verdict(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1")
    store.record_verdict("P-1", "op-8", "escalate", None, datetime.now(UTC))
    client = app.test_client()
    token = sign_in(client)
    refused = client.post(
        "/supervisor/resolve", data={"part_id": "P-1", "outcome": "pass", "csrf_token": token}
    )
    assert refused.status_code == 403
    assert "Only a supervisor" in refused.get_data(as_text=True)
    assert store.escalation_count() == 1
    # Nor can the operator's own verdict form overrule the escalation.
    again = post_verdict(client, token, {"part_id": "P-1", "outcome": "pass"})
    assert again.get_json()["result"] == "already_judged"
    assert verdicts(store) == [("P-1", "op-8", "escalate", None)]


def test_a_signed_out_screen_cannot_record_a_verdict(app: Flask, store: StationStore) -> None:
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    token = csrf_of(client)  # the form still on screen keeps its token after sign-out
    answer = post_verdict(client, token, {"part_id": "P-1", "outcome": "pass"})
    assert answer.status_code == 401 and "Signed out" in answer.get_json()["error"]
    page = client.post("/verdict", data={"part_id": "P-1", "outcome": "pass", "csrf_token": token})
    assert page.status_code == 401 and "Signed out" in page.get_data(as_text=True)
    assert verdicts(store) == []


def test_every_post_route_refuses_a_request_without_the_session_token(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1")
    add_part(store, "P-2")
    add_part(store, "P-3")
    store.record_verdict("P-2", "op-7", "escalate", None, datetime.now(UTC))
    store.record_verdict("P-3", "op-7", "pass", "ok", datetime.now(UTC))
    client = app.test_client()
    sign_in(client, "sup-1", SUPERVISOR_PIN)
    forms = {
        "/verdict": {"part_id": "P-1", "outcome": "pass"},
        "/supervisor/resolve": {"part_id": "P-2", "outcome": "pass"},
        "/supervisor/correct": {"part_id": "P-3", "outcome": "reject"},
        "/supervisor/automation": {"level": "full", "reason": "test"},
        "/login": {"badge": "op-7", "pin": OPERATOR_PIN},
        "/logout": {},
    }
    posted = {
        rule.rule for rule in app.url_map.iter_rules() if "POST" in (rule.methods or set())
    }
    assert posted == set(forms), "a new POST route: add it here"
    for path, form in forms.items():
        for given in ({}, {"csrf_token": "forged"}):
            answer = client.post(path, data={**form, **given})
            if path == "/login":
                # A signed-in screen takes a sign-in without the token as a double tap on Sign
                # in: nothing is done with the form (op-7's PIN does not sign op-7 in).
                assert answer.status_code == 302, path
                continue
            assert answer.status_code == 400, path
            assert "security token" in answer.get_data(as_text=True), path
    assert verdicts(store) == [("P-2", "op-7", "escalate", None), ("P-3", "op-7", "pass", "ok")]
    assert [v.part_id for v in store.correctable_verdicts()] == ["P-3"]  # not corrected
    assert store.open_requests() == []
    assert client.get("/supervisor").status_code == 200  # still signed in as the supervisor
    client.post("/logout", data={"csrf_token": csrf_of(client, "/status")})
    refused = client.post("/login", data=forms["/login"])
    assert refused.status_code == 400 and "security token" in refused.get_data(as_text=True)
    assert client.get("/status").status_code == 302  # not signed in
