"""The station UI through Flask's test client, on a real station store in a temp folder."""

from __future__ import annotations

import argparse
import errno
import html
import io
import os
import re
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge_agent.store import PartLogEntry, ReviewItem, StationStore
from linesight.protocol import AutomationLevel
from station_ui.app import create_app
from station_ui.commands import load_secret, register
from station_ui.config import UiConfig
from station_ui.security import LockPolicy, SignInLimiter, hash_pin, verify_pin
from station_ui.views import shift_start

JPEG = b"\xff\xd8\xff\xe0" + b"part-image" * 10 + b"\xff\xd9"
HOSTILE_IDS = ("<script>alert(1)</script>", "\"'><img src=x onerror=1>")
# Hashing is deliberately slow; every test shares these two.
OPERATOR_PIN = "4321"
SUPERVISOR_PIN = "98765"
_HASHES = {OPERATOR_PIN: hash_pin(OPERATOR_PIN), SUPERVISOR_PIN: hash_pin(SUPERVISOR_PIN)}


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = StationStore(tmp_path / "data")
    opened.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    opened.upsert_operator("sup-1", "Sam Supervisor", "supervisor", _HASHES[SUPERVISOR_PIN])
    yield opened
    opened.close()


def make_app(store: StationStore, clock: FakeClock, **settings: Any) -> Flask:
    """The UI on `store`; `clock` is its wall clock and, unless `monotonic` is given (None: the
    real one), also the clock that measures its durations (idle time, sign-in locks)."""
    if settings.setdefault("monotonic", clock) is None:
        del settings["monotonic"]
    config = UiConfig(
        data_dir=store.data_dir, secret_key=b"k" * 32, clock=clock, **settings
    )
    app = create_app(config, store)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def app(store: StationStore, clock: FakeClock) -> Flask:
    return make_app(store, clock)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def add_part(
    store: StationStore,
    part_id: str,
    *,
    age_s: float = 0.0,
    automation: str = "assist",
    reason: str = "operator_decides",
    suggestion: str | None = "defect",
    confidence: float | None = 0.62,
) -> None:
    store.add_review(ReviewItem(
        part_id=part_id,
        created=datetime.now(UTC) - timedelta(seconds=age_s),
        reason=reason,
        automation=automation,
        suggestion=suggestion,
        confidence=confidence,
        model_label=suggestion,
        candidate_label=None,
        active_version="1.0.0",
        candidate_version=None,
        image_jpeg=JPEG,
    ))


def csrf_of(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def sign_in(client: FlaskClient, badge: str = "op-7", pin: str = OPERATOR_PIN) -> str:
    token = csrf_of(client)
    response = client.post("/login", data={"badge": badge, "pin": pin, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    # The token is renewed at sign-in.
    return csrf_of(client, "/status")


def judge(client: FlaskClient, token: str, part_id: str, outcome: str) -> Any:
    return client.post(
        "/verdict",
        data={"part_id": part_id, "outcome": outcome},
        headers={"X-CSRF-Token": token, "Accept": "application/json"},
    )


def status_doc(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "station": "press-01", "online": True, "broker_connected": True,
        "rollout_active": False, "faults": [], "outbox_depth": 0, "automation": "assist",
        "mode": "none", "active": {"name": "part-classifier", "version": "1.0.0"},
        "candidate": None,
    }
    doc.update(fields)
    return doc


def banner_kinds(client: FlaskClient) -> list[str]:
    return [banner["kind"] for banner in client.get("/api/queue").get_json()["banners"]]


# --- headers, cookies, sign-in ---------------------------------------------------------------


def test_every_response_carries_the_security_headers(client: FlaskClient) -> None:
    responses = [
        client.get("/login"),
        client.get("/static/station.css"),
        client.get("/api/queue"),
        client.get("/no-such-page"),
    ]
    for response in responses:
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        response.close()


def test_pages_have_no_inline_script_or_style(client: FlaskClient, store: StationStore) -> None:
    add_part(store, "P-1")
    sign_in(client, "sup-1", SUPERVISOR_PIN)
    for path in ("/", "/status", "/supervisor", "/login"):
        page = client.get(path).get_data(as_text=True)
        assert "<script>" not in page and " style=" not in page and "<style" not in page
        assert re.search(r"\son[a-z]+=", page) is None, f"inline handler on {path}"


def test_session_cookie_is_httponly_and_samesite_strict(client: FlaskClient) -> None:
    sign_in(client)
    cookie = client.get_cookie(client.application.config["SESSION_COOKIE_NAME"])
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"


def test_pages_and_api_need_a_signed_in_operator(client: FlaskClient, store: StationStore) -> None:
    add_part(store, "P-1")
    assert client.get("/").headers["Location"].startswith("/login")
    assert client.get("/api/queue").status_code == 401
    assert client.get("/image?part=P-1").status_code in (302, 401)
    token = csrf_of(client)
    assert judge(client, token, "P-1", "pass").status_code == 401
    assert store.verdicts_since(datetime(2000, 1, 1, tzinfo=UTC)) == []


def test_sign_in_with_badge_and_pin(client: FlaskClient) -> None:
    token = csrf_of(client)
    wrong = client.post("/login", data={"badge": "op-7", "pin": "0000", "csrf_token": token})
    assert wrong.status_code == 401
    assert "not recognised" in wrong.get_data(as_text=True)
    sign_in(client)
    page = client.get("/").get_data(as_text=True)
    assert "Ana Operator" in page and "No parts waiting" in page


@pytest.mark.parametrize(
    ("target", "lands_on"),
    [
        ("/status", "/status"),
        ("/supervisor", "/supervisor"),
        ("/status\n", "/"),  # a header may not hold a newline: this was a 500
        ("/\n", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/status", "/"),
    ],
)
def test_sign_in_returns_only_to_our_own_pages(
    client: FlaskClient, target: str, lands_on: str
) -> None:
    token = csrf_of(client)
    response = client.post(
        "/login", data={"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": token, "next": target}
    )
    assert response.status_code == 302
    assert response.headers["Location"] == lands_on
    again = client.get("/login", query_string={"next": target})  # already signed in
    assert again.status_code == 302
    assert again.headers["Location"] == lands_on


def test_pin_hash_is_salted_scrypt_and_checks_in_constant_time() -> None:
    first, second = hash_pin("1234"), hash_pin("1234")
    assert first.startswith("scrypt$") and first != second
    assert verify_pin("1234", first) and not verify_pin("1235", first)
    assert not verify_pin("1234", "garbage") and not verify_pin("1234", "scrypt$1$2$3$x$y")
    with pytest.raises(ValueError):
        hash_pin("12a4")


# --- CSRF -------------------------------------------------------------------------------------


def test_a_post_without_the_session_token_is_refused(
    client: FlaskClient, store: StationStore
) -> None:
    add_part(store, "P-1")
    refused = client.post("/login", data={"badge": "op-7", "pin": OPERATOR_PIN})
    assert refused.status_code == 400
    assert "security token" in refused.get_data(as_text=True)
    token = sign_in(client)
    assert judge(client, "forged", "P-1", "reject").status_code == 400
    no_token = client.post("/verdict", data={"part_id": "P-1", "outcome": "reject"})
    assert no_token.status_code == 400
    assert store.review("P-1").outcome is None  # type: ignore[union-attr]
    assert judge(client, token, "P-1", "reject").status_code == 200


def test_the_token_of_another_session_is_refused(app: Flask, store: StationStore) -> None:
    add_part(store, "P-1")
    mallory, ana = app.test_client(), app.test_client()
    stolen = sign_in(mallory)
    sign_in(ana)
    assert judge(ana, stolen, "P-1", "pass").status_code == 400


# --- idle sign-out and session end ----------------------------------------------------------


def test_idle_operator_is_signed_out(client: FlaskClient, clock: FakeClock) -> None:
    sign_in(client)
    clock.advance(299)
    assert client.get("/").status_code == 200
    clock.advance(299)
    assert client.get("/").status_code == 200  # activity keeps the session
    clock.advance(301)
    response = client.get("/")
    assert response.status_code == 302 and "reason=idle" in response.headers["Location"]
    assert "signed out after a while" in client.get("/login?reason=idle").get_data(as_text=True)
    assert client.get("/api/queue").status_code == 401


def test_polling_does_not_keep_a_session_alive(client: FlaskClient, clock: FakeClock) -> None:
    sign_in(client)
    for _ in range(4):
        clock.advance(100)
        if client.get("/api/queue").status_code != 200:
            break
    assert client.get("/api/queue").status_code == 401


def test_idle_timeout_is_configurable(store: StationStore, clock: FakeClock) -> None:
    client = make_app(store, clock, idle_timeout_s=30).test_client()
    sign_in(client)
    clock.advance(31)
    assert client.get("/api/queue").status_code == 401


def test_a_pin_reset_ends_open_sessions(client: FlaskClient, store: StationStore) -> None:
    sign_in(client)
    store.upsert_operator("op-7", "Ana Operator", "operator", hash_pin("5555"))
    assert client.get("/api/queue").status_code == 401


def test_a_second_tap_on_sign_in_lands_on_the_page_not_on_an_error(
    client: FlaskClient, store: StationStore
) -> None:
    """A double tap on Sign in sends the form twice with the token of the signed-out page; the
    first sign-in has renewed the token by the time the second arrives."""
    token = csrf_of(client)
    form = {"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": token, "next": "/status"}
    assert client.post("/login", data=form).status_code == 302
    again = client.post("/login", data=form, follow_redirects=True)
    assert again.status_code == 200 and again.request.path == "/status"
    assert "Ana Operator" in again.get_data(as_text=True)
    # Nothing is done with what the stale form carries: another badge does not sign in.
    other = {**form, "badge": "sup-1", "pin": SUPERVISOR_PIN}
    assert client.post("/login", data=other).status_code == 302
    assert "Ana Operator" in client.get("/status").get_data(as_text=True)
    # Signed out, a stale token is refused as before.
    client.post("/logout", data={"csrf_token": csrf_of(client, "/status")})
    assert client.post("/login", data={**form, "csrf_token": "stale"}).status_code == 400


def test_sign_out(client: FlaskClient) -> None:
    token = sign_in(client)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/api/queue").status_code == 401


# --- rate limit on failed sign-ins ----------------------------------------------------------


def _try(client: FlaskClient, badge: str, pin: str) -> int:
    token = csrf_of(client)
    return client.post(
        "/login", data={"badge": badge, "pin": pin, "csrf_token": token}
    ).status_code


def test_five_failures_lock_the_badge_for_30_s(client: FlaskClient, clock: FakeClock) -> None:
    assert [_try(client, "op-7", "1111") for _ in range(5)] == [401, 401, 401, 401, 429]
    assert _try(client, "op-7", OPERATOR_PIN) == 429  # even the right PIN waits
    page = client.post(
        "/login", data={"badge": "op-7", "pin": "1", "csrf_token": csrf_of(client)}
    ).get_data(as_text=True)
    assert "Try again in 30 s" in page
    clock.advance(31)
    assert _try(client, "op-7", OPERATOR_PIN) == 302


def test_locks_double_and_stop_at_five_minutes() -> None:
    now = [0.0]
    limiter = SignInLimiter(lambda: now[0])
    policy = LockPolicy(max_failures=5, first_lock_s=30, max_lock_s=300)
    locks = []
    for _ in range(6):
        for _ in range(5):
            lock = limiter.fail("badge:x", policy)
        locks.append(lock)
        now[0] += lock + 1
    assert locks == [30, 60, 120, 240, 300, 300]
    limiter.succeed("badge:x")
    assert limiter.locked_for("badge:x") == 0


def test_many_badges_from_one_address_lock_that_address(
    client: FlaskClient, clock: FakeClock
) -> None:
    codes = [_try(client, f"guess-{n}", "1234") for n in range(20)]
    assert codes[-1] == 429 and set(codes[:-1]) == {401}
    assert _try(client, "op-7", OPERATOR_PIN) == 429
    clock.advance(31)
    assert _try(client, "op-7", OPERATOR_PIN) == 302


# --- the queue --------------------------------------------------------------------------------


def test_queue_shows_the_oldest_part_first_and_the_count(
    client: FlaskClient, store: StationStore
) -> None:
    add_part(store, "P-new", age_s=1)
    add_part(store, "P-old", age_s=60, reason="low_confidence")
    add_part(store, "P-mid", age_s=30)
    sign_in(client)
    queue = client.get("/api/queue").get_json()
    assert queue["count"] == 3 and queue["head"] == "P-old"
    assert [item["part_id"] for item in queue["items"]] == ["P-old", "P-mid", "P-new"]
    page = client.get("/").get_data(as_text=True)
    current = page[page.index('id="current"') : page.index("</section>")]
    assert "P-old" in current and "Low confidence" in current
    assert 'id="queue-count" aria-label="parts waiting">3<' in page


def test_suggestion_is_hidden_at_the_shadow_level(
    client: FlaskClient, store: StationStore
) -> None:
    add_part(store, "P-shadow", age_s=10, automation="shadow", suggestion="defect",
             confidence=0.93, reason="operator_decides")
    add_part(store, "P-assist", age_s=5, automation="assist", suggestion="defect",
             confidence=0.93)
    sign_in(client)
    page = client.get("/").get_data(as_text=True)
    assert "Model suggests" not in page and "93 %" not in page
    items = client.get("/api/queue").get_json()["items"]
    assert items[0]["suggestion"] is None and items[0]["confidence"] is None
    assert items[1]["suggestion"] == "defect" and items[1]["confidence"] == 0.93
    token = csrf_of(client, "/")
    judge(client, token, "P-shadow", "pass")
    page = client.get("/partial/current").get_data(as_text=True)
    assert "Model suggests" in page and "93 % sure" in page


@pytest.mark.parametrize("reason", ["audit", "disagreement"])
def test_suggestion_is_hidden_when_the_verdict_grades_the_model(
    client: FlaskClient, store: StationStore, reason: str
) -> None:
    add_part(store, "P-1", automation="full", reason=reason, suggestion="ok", confidence=0.99)
    sign_in(client)
    assert "Model suggests" not in client.get("/").get_data(as_text=True)
    assert client.get("/api/queue").get_json()["items"][0]["suggestion"] is None


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_hostile_part_ids_are_escaped(
    client: FlaskClient, store: StationStore, hostile: str
) -> None:
    add_part(store, hostile, age_s=10)
    add_part(store, hostile + "-2", age_s=5)
    token = sign_in(client)
    for path in ("/", "/partial/current"):
        page = client.get(path).get_data(as_text=True)
        assert hostile not in page
        assert "&lt;" in page
    assert "<img src=x" not in client.get("/").get_data(as_text=True)
    assert client.get("/api/queue").get_json()["head"] == hostile
    response = client.post(
        "/verdict", data={"part_id": hostile, "outcome": "pass", "csrf_token": token},
        follow_redirects=True,
    )
    page = response.get_data(as_text=True)
    assert "passed" in page and hostile not in page


def test_image_route_serves_a_queued_part_and_refuses_others(
    client: FlaskClient, store: StationStore
) -> None:
    add_part(store, "P-1")
    add_part(store, "<b>odd/../../id</b>")
    sign_in(client)
    with client.get("/image?part=P-1") as image:
        assert image.status_code == 200 and image.mimetype == "image/jpeg"
        assert image.data == JPEG
    with client.get("/image", query_string={"part": "<b>odd/../../id</b>"}) as image:
        assert image.data == JPEG
    for unknown in ("P-2", "", "../station.db", "images/../station.db", "x" * 500):
        assert client.get("/image", query_string={"part": unknown}).status_code == 404


# --- verdicts ---------------------------------------------------------------------------------


def test_a_double_tap_stores_one_verdict(client: FlaskClient, store: StationStore) -> None:
    add_part(store, "P-1")
    token = sign_in(client)
    first = judge(client, token, "P-1", "reject")
    second = judge(client, token, "P-1", "pass")
    assert first.get_json()["result"] == "recorded"
    assert second.get_json()["result"] == "already_judged"
    verdicts = store.verdicts_since(datetime(2000, 1, 1, tzinfo=UTC))
    assert len(verdicts) == 1
    assert (verdicts[0].operator, verdicts[0].outcome, verdicts[0].label) == (
        "op-7", "reject", "defect",
    )
    assert client.get("/api/queue").get_json()["count"] == 0


def test_outcomes_carry_the_true_label(client: FlaskClient, store: StationStore) -> None:
    for part_id in ("P-pass", "P-reject", "P-escalate"):
        add_part(store, part_id)
    token = sign_in(client)
    for outcome in ("pass", "reject", "escalate"):
        assert judge(client, token, f"P-{outcome}", outcome).status_code == 200
    labels = {v.part_id: v.label for v in store.verdicts_since(datetime(2000, 1, 1, tzinfo=UTC))}
    assert labels == {"P-pass": "ok", "P-reject": "defect", "P-escalate": None}


def test_a_form_verdict_without_javascript_redirects_with_a_message(
    client: FlaskClient, store: StationStore
) -> None:
    add_part(store, "P-1")
    token = sign_in(client)
    data = {"part_id": "P-1", "outcome": "reject", "csrf_token": token}
    page = client.post("/verdict", data=data, follow_redirects=True).get_data(as_text=True)
    assert "Part P-1 rejected." in page
    page = client.post("/verdict", data=data, follow_redirects=True).get_data(as_text=True)
    assert "Part P-1 was already judged." in page


def test_bad_verdicts_are_refused(client: FlaskClient, store: StationStore) -> None:
    add_part(store, "P-1")
    token = sign_in(client)
    assert judge(client, token, "P-unknown", "pass").status_code == 404
    assert judge(client, token, "P-1", "maybe").status_code == 400
    assert store.review("P-1").outcome is None  # type: ignore[union-attr]


# --- banners ----------------------------------------------------------------------------------


def test_banners_follow_the_agent_status(
    client: FlaskClient, store: StationStore, clock: FakeClock
) -> None:
    sign_in(client)
    assert banner_kinds(client) == ["agent_down"]  # the agent never wrote a status
    store.save_status(status_doc())
    assert banner_kinds(client) == []
    store.save_status(status_doc(broker_connected=False))
    assert banner_kinds(client) == ["broker_offline"]
    store.save_status(status_doc(outbox_depth=501))
    assert banner_kinds(client) == ["outbox"]
    fault = {"code": "active_inference", "message": "active model returned NaN", "since": "x"}
    store.save_status(status_doc(faults=[fault]))
    assert banner_kinds(client) == ["fault"]
    candidate = {"name": "part-classifier", "version": "2.0.0", "sha256": "0" * 64}
    store.save_status(status_doc(candidate=candidate, rollout_active=True, mode="shadow"))
    assert banner_kinds(client) == ["rollout"]
    assert "part-classifier 2.0.0" in client.get("/").get_data(as_text=True)
    clock.advance(6)
    assert banner_kinds(client)[0] == "agent_down"


def test_a_station_fault_is_not_called_a_model_fault(
    client: FlaskClient, store: StationStore
) -> None:
    sign_in(client)

    def fault(code: str, message: str) -> dict[str, str]:
        return {"code": code, "message": message, "since": "x"}

    def shown() -> list[tuple[str, str, str]]:
        answer = client.get("/api/queue", headers={"Accept": "application/json"}).get_json()
        return [(b["kind"], b["severity"], b["text"]) for b in answer["banners"]]

    store.save_status(status_doc(faults=[fault("disk_low", "only 0.5 GB free")]))
    assert shown() == [("station_fault", "warn",
                        "Station fault (disk_low): only 0.5 GB free. Tell maintenance.")]
    store.save_status(status_doc(faults=[
        fault("candidate_inference", "candidate model timed out"),
        fault("disk_low", "only 0.5 GB free"),
        fault("broker_denied", "the broker refuses to take messages on x"),
    ]))
    assert shown() == [
        ("fault", "alarm", "Model fault (candidate_inference): candidate model timed out. "
                           "Held parts come to this queue."),
        ("station_fault", "alarm", "Station fault (disk_low, broker_denied): only 0.5 GB free. "
                                   "Tell maintenance."),
    ]


# --- status page ------------------------------------------------------------------------------


def test_status_page_shows_models_and_shift_numbers(
    client: FlaskClient, store: StationStore
) -> None:
    candidate = {"name": "part-classifier", "version": "2.0.0", "sha256": "0" * 64}
    store.save_status(status_doc(candidate=candidate, mode="shadow", rollout_active=True))
    now = datetime.now(UTC)
    for n in range(10):
        store.log_part(PartLogEntry(
            part_id=f"L-{n}", ts=now - timedelta(seconds=n), action="pass",
            decided_by="active", active_label="ok", candidate_label="ok" if n < 8 else "defect",
            agree=n < 8, active_confidence=0.9,
        ))
    add_part(store, "P-1", suggestion="defect")
    token = sign_in(client)
    judge(client, token, "P-1", "reject")
    page = client.get("/status").get_data(as_text=True)
    assert "part-classifier 1.0.0" in page and "part-classifier 2.0.0" in page
    assert "80.0 %" in page  # models agree on 8 of 10
    assert "100.0 %" in page  # the operator agreed with the model's defect
    assert page.count("<svg") >= 3
    status = client.get("/api/status").get_json()
    assert status["candidate"] == "part-classifier 2.0.0" and status["mode"] == "shadow"


def test_shift_start() -> None:
    def local(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
        return datetime(year, month, day, hour, minute).astimezone()  # on the wall clock

    at = local(2024, 5, 6, 13, 59)
    assert shift_start(at, 6, 8) == local(2024, 5, 6, 6, 0)
    assert shift_start(local(2024, 5, 6, 14, 0), 6, 8) == local(2024, 5, 6, 14, 0)
    early = local(2024, 5, 6, 3, 0)
    assert shift_start(early, 6, 8) == local(2024, 5, 5, 22, 0)
    assert shift_start(early, 6, 12) == local(2024, 5, 5, 18, 0)
    assert shift_start(early.astimezone(UTC), 6, 12) == local(2024, 5, 5, 18, 0)


# --- supervisor -------------------------------------------------------------------------------


def test_operators_cannot_use_the_supervisor_page(
    client: FlaskClient, store: StationStore
) -> None:
    token = sign_in(client)
    assert client.get("/supervisor").status_code == 403
    response = client.post(
        "/supervisor/automation",
        data={"level": "full", "reason": "because", "csrf_token": token},
    )
    assert response.status_code == 403
    assert store.open_requests() == []
    assert "Supervisor" not in client.get("/status").get_data(as_text=True).split("<main>")[0]


def test_a_supervisor_changes_the_automation_level(
    client: FlaskClient, store: StationStore
) -> None:
    store.save_status(status_doc())
    token = sign_in(client, "sup-1", SUPERVISOR_PIN)
    assert client.get("/supervisor").status_code == 200
    missing = client.post(
        "/supervisor/automation", data={"level": "partial", "reason": " ", "csrf_token": token}
    )
    assert missing.status_code == 400 and "Give a reason" in missing.get_data(as_text=True)
    assert store.open_requests() == []
    done = client.post(
        "/supervisor/automation",
        data={"level": "partial", "reason": "model 1.0.0 audited for a week", "csrf_token": token},
        follow_redirects=True,
    )
    assert done.status_code == 200 and "switch to" in done.get_data(as_text=True)
    [request] = store.open_requests()
    assert (request.level, request.reason, request.by) == (
        "partial", "model 1.0.0 audited for a week", "sup-1",
    )


def test_levels_above_the_fleet_maximum_are_refused(
    store: StationStore, clock: FakeClock
) -> None:
    client = make_app(store, clock, max_automation=AutomationLevel.ASSIST).test_client()
    token = sign_in(client, "sup-1", SUPERVISOR_PIN)
    page = client.get("/supervisor").get_data(as_text=True)
    assert re.search(r'value="full"[^>]*disabled', page)
    refused = client.post(
        "/supervisor/automation", data={"level": "full", "reason": "x", "csrf_token": token}
    )
    assert refused.status_code == 403
    assert "at most 'assist'" in html.unescape(refused.get_data(as_text=True))
    assert store.open_requests() == []
    client.post(
        "/supervisor/automation", data={"level": "assist", "reason": "x", "csrf_token": token}
    )
    assert [r.level for r in store.open_requests()] == ["assist"]


def test_an_escalated_part_reaches_the_supervisor_who_gives_the_final_verdict(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1", age_s=30, reason="disagreement")
    add_part(store, "P-2", age_s=20)
    operator = app.test_client()
    token = sign_in(operator)
    escalated = judge(operator, token, "P-1", "escalate")
    assert escalated.get_json()["result"] == "recorded"
    assert "P-1" not in operator.get("/").get_data(as_text=True)  # off the operator's queue
    assert operator.get("/supervisor").status_code == 403
    refused = operator.post(
        "/supervisor/resolve", data={"part_id": "P-1", "outcome": "pass"},
        headers={"X-CSRF-Token": token},
    )
    assert refused.status_code == 403

    supervisor = app.test_client()
    token = sign_in(supervisor, "sup-1", SUPERVISOR_PIN)
    nav = supervisor.get("/status").get_data(as_text=True).split("<main>")[0]
    assert 'aria-label="escalated parts waiting">1<' in nav
    page = supervisor.get("/supervisor").get_data(as_text=True)
    assert 'data-part-id="P-1"' in page and "escalated by op-7" in page
    assert "Model suggests" not in page  # a disagreement grades the models: no suggestion

    for data, status in (
        ({"part_id": "P-1", "outcome": "escalate"}, 400),
        ({"part_id": "", "outcome": "pass"}, 400),
        ({"part_id": "P-2", "outcome": "reject"}, 404),  # waiting for an operator, not escalated
        ({"part_id": "nope", "outcome": "reject"}, 404),
    ):
        response = supervisor.post("/supervisor/resolve", data={**data, "csrf_token": token})
        assert response.status_code == status, data
    assert store.escalation_count() == 1

    done = supervisor.post(
        "/supervisor/resolve", data={"part_id": "P-1", "outcome": "reject", "csrf_token": token},
        follow_redirects=True,
    )
    assert done.status_code == 200
    assert "P-1 rejected: final verdict recorded" in done.get_data(as_text=True)
    assert store.escalations() == []
    again = supervisor.post(
        "/supervisor/resolve", data={"part_id": "P-1", "outcome": "pass", "csrf_token": token},
        follow_redirects=True,
    )
    assert "already has a supervisor" in again.get_data(as_text=True)
    sent = store.unpublished_verdicts()
    assert [(v.part_id, v.operator, v.outcome, v.label) for v in sent] == [
        ("P-1", "op-7", "escalate", None), ("P-1", "sup-1", "reject", "defect"),
    ]
    assert "No part is waiting for you" in supervisor.get("/supervisor").get_data(as_text=True)


def test_a_supervisor_corrects_a_verdict_an_operator_gave_by_mistake(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1", age_s=30)
    add_part(store, "P-2", age_s=20)
    operator = app.test_client()
    token = sign_in(operator)
    assert judge(operator, token, "P-1", "pass").get_json()["result"] == "recorded"
    refused = operator.post(
        "/supervisor/correct", data={"part_id": "P-1", "outcome": "reject"},
        headers={"X-CSRF-Token": token},
    )
    assert refused.status_code == 403  # operators ask their supervisor

    supervisor = app.test_client()
    token = sign_in(supervisor, "sup-1", SUPERVISOR_PIN)
    page = html.unescape(supervisor.get("/supervisor").get_data(as_text=True))
    section = page.split('id="corrections"')[1].split("</section>")[0]
    assert 'data-part-id="P-1"' in section and "passed</strong> by op-7" in section
    assert 'value="reject"' in section and "Change to reject" in section
    assert "P-2" not in section  # not judged yet: the operator's queue has it

    for data, status in (
        ({"part_id": "P-1", "outcome": "escalate"}, 400),
        ({"part_id": "P-1", "outcome": "pass"}, 409),  # what the operator gave already
        ({"part_id": "P-2", "outcome": "reject"}, 404),
        ({"part_id": "nope", "outcome": "reject"}, 404),
    ):
        response = supervisor.post("/supervisor/correct", data={**data, "csrf_token": token})
        assert response.status_code == status, data
        assert 'role="alert"' in response.get_data(as_text=True)
    assert store.unpublished_verdicts()[-1].operator == "op-7"

    done = supervisor.post(
        "/supervisor/correct", data={"part_id": "P-1", "outcome": "reject", "csrf_token": token},
        follow_redirects=True,
    )
    text = html.unescape(done.get_data(as_text=True))
    assert done.status_code == 200
    assert "P-1 corrected to rejected" in text and "take it off the line by hand" in text
    assert "No pass or reject to correct" in text
    again = supervisor.post(
        "/supervisor/correct", data={"part_id": "P-1", "outcome": "reject", "csrf_token": token},
        follow_redirects=True,
    )
    assert "already has a supervisor" in html.unescape(again.get_data(as_text=True))
    sent = store.unpublished_verdicts()
    assert [(v.part_id, v.operator, v.outcome, v.label) for v in sent] == [
        ("P-1", "op-7", "pass", "ok"), ("P-1", "sup-1", "reject", "defect"),
    ]
    forged = supervisor.post("/supervisor/correct", data={"part_id": "P-1", "outcome": "pass"})
    assert forged.status_code in (400, 403)


def test_a_resolution_needs_the_session_token(app: Flask, store: StationStore) -> None:
    add_part(store, "P-1")
    store.record_verdict("P-1", "op-7", "escalate", None, datetime.now(UTC))
    supervisor = app.test_client()
    sign_in(supervisor, "sup-1", SUPERVISOR_PIN)
    forged = supervisor.post("/supervisor/resolve", data={"part_id": "P-1", "outcome": "pass"})
    assert forged.status_code in (400, 403)
    assert store.escalation_count() == 1


# --- command line -----------------------------------------------------------------------------


def _cli(argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch) -> int:
    parser = argparse.ArgumentParser(prog="linesight")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code: int = args.handler(args)
    return code


def test_ui_operator_add_and_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "station"
    StationStore(data).close()
    add = ["ui-operator", "add", "--data-dir", str(data), "--badge", "B-12", "--name", "Lee"]
    assert _cli(add, "2468\n", monkeypatch) == 0
    assert _cli(add, "2468\n", monkeypatch) == 2
    assert "exists" in capsys.readouterr().err
    reset = ["ui-operator", "reset", "--data-dir", str(data), "--badge", "B-12",
             "--role", "supervisor"]
    assert _cli(reset, "13579\n", monkeypatch) == 0
    assert _cli(reset[:-2], "12\n", monkeypatch) == 2
    assert "4 to 12 digits" in capsys.readouterr().err
    missing = ["ui-operator", "reset", "--data-dir", str(data), "--badge", "nobody"]
    assert _cli(missing, "1234\n", monkeypatch) == 2
    with StationStore(data) as store:
        operator = store.operator("B-12")
    assert operator is not None and operator.role == "supervisor" and operator.name == "Lee"
    assert verify_pin("13579", operator.pin_hash)


def test_the_session_key_file_is_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ui-secret.key"
    key = load_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= 32
    assert load_secret(path) == key


def _share_cookies(source: FlaskClient, target: FlaskClient, names: list[str]) -> None:
    """What one browser does with two screens on one host: cookies are kept per host, not per
    port, so what one screen sets is sent to the other too."""
    for name in names:
        cookie = source.get_cookie(name)
        if cookie is not None:
            target.set_cookie(name, cookie.value)


def test_a_first_start_on_a_full_disk_leaves_no_empty_key_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key file is created, then written: when the write fails (a full disk), the empty
    file must not stay, or every later start would refuse it as too short."""
    path = tmp_path / "ui-secret.key"
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, _data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(fd: int, *args: Any, **kwargs: Any) -> Any:
        os.close(fd)
        return FullDisk()

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(OSError, match="No space left"):
        load_secret(path)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert not path.exists()
    assert len(load_secret(path)) >= 16  # the disk has room again: the next start works


def test_two_station_screens_on_one_host_keep_their_own_sessions(
    tmp_path: Path, clock: FakeClock
) -> None:
    stores = [StationStore(tmp_path / station) for station in ("press-01", "press-02")]
    try:
        configs = []
        for index, station_store in enumerate(stores):
            station_store.upsert_operator("op-7", "Ana Operator", "operator",
                                          _HASHES[OPERATOR_PIN])
            add_part(station_store, "P-1")
            configs.append(UiConfig(data_dir=station_store.data_dir,
                                    secret_key=bytes([65 + index]) * 32, clock=clock))
        apps = [create_app(config, s) for config, s in zip(configs, stores, strict=True)]
        names = [app.config["SESSION_COOKIE_NAME"] for app in apps]
        assert names[0] != names[1]
        first, second = (app.test_client() for app in apps)

        first_token = sign_in(first)
        _share_cookies(first, second, names)
        second_token = sign_in(second)
        _share_cookies(second, first, names)
        assert judge(first, first_token, "P-1", "reject").status_code == 200
        _share_cookies(first, second, names)
        assert judge(second, second_token, "P-1", "pass").status_code == 200
        outcomes = [s.review("P-1") for s in stores]
        assert [row.outcome if row else None for row in outcomes] == ["reject", "pass"]

        # the first screen restarts (same data dir and key): same cookie name, still signed in
        restarted = create_app(configs[0], stores[0])
        assert restarted.config["SESSION_COOKIE_NAME"] == names[0]
        browser = restarted.test_client()
        _share_cookies(first, browser, names)
        assert browser.get("/api/queue", headers={"Accept": "application/json"}).status_code == 200
    finally:
        for station_store in stores:
            station_store.close()


def test_verdicts_carry_the_running_models_own_labels(
    client: FlaskClient, store: StationStore
) -> None:
    """A good/ng model's station: Reject is 'ng', not the screen's default 'defect'."""
    store.save_status(status_doc(model_labels={"ok": "good", "defect": "ng"}))
    add_part(store, "P-1")
    add_part(store, "P-2")
    token = sign_in(client)
    judge(client, token, "P-1", "reject")
    judge(client, token, "P-2", "pass")
    assert [(v.part_id, v.label) for v in store.unpublished_verdicts()] == [
        ("P-1", "ng"), ("P-2", "good"),
    ]


@pytest.mark.parametrize(("status", "expected"), [
    (None, ("ok", "defect")),
    ({}, ("ok", "defect")),
    ({"model_labels": {"ok": "good", "defect": "ng"}}, ("good", "ng")),
    ({"model_labels": {"ok": "good"}}, ("ok", "defect")),
    ({"model_labels": {"ok": "x", "defect": "x"}}, ("ok", "defect")),
    ({"model_labels": {"ok": "", "defect": "ng"}}, ("ok", "defect")),
    ({"model_labels": {"ok": "g" * 65, "defect": "ng"}}, ("ok", "defect")),
    ({"model_labels": ["good", "ng"]}, ("ok", "defect")),
])
def test_verdict_labels_come_from_a_sound_snapshot_only(
    status: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    from station_ui.views import verdict_labels

    assert verdict_labels(status, "ok", "defect") == expected


def test_a_post_to_a_path_or_method_no_route_takes_is_404_or_405_not_a_token_error(
    client: FlaskClient,
) -> None:
    assert client.post("/no-such-page", data={}).status_code == 404
    assert client.post("/status", data={}).status_code == 405  # /status is GET only
    # A real form without its token is still refused as such.
    assert client.post("/login", data={"badge": "op-7", "pin": OPERATOR_PIN}).status_code == 400
