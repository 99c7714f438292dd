"""The sign-in page says why the operator was signed out: idle, the sign-in's time limit, or a
sign-out elsewhere; never "without activity" to an operator who was busy all along."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge_agent.store import StationStore
from tests.unit.test_station_ui import FakeClock, make_app, sign_in
from tests.unit.test_station_ui_sessions import copy_of, open_store

JSON = {"Accept": "application/json"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = open_store(tmp_path / "data")
    yield opened
    opened.close()


@pytest.fixture
def app(store: StationStore, clock: FakeClock) -> Flask:
    return make_app(store, clock)


def keep_busy_past_the_limit(client: FlaskClient, clock: FakeClock) -> None:
    """Tap the screen every four minutes for twelve hours and a bit."""
    for _ in range(12 * 15):
        clock.advance(240)
        assert client.get("/status").status_code == 200
    clock.advance(240)


def test_a_busy_operator_at_the_12_hour_limit_is_told_so(app: Flask, clock: FakeClock) -> None:
    client = app.test_client()
    sign_in(client)
    keep_busy_past_the_limit(client, clock)
    other_tab = copy_of(client, app)
    answer = client.get("/api/queue", headers=JSON)  # the page's own polling
    assert answer.status_code == 401 and answer.get_json()["reason"] == "expired"
    response = other_tab.get("/")
    assert response.status_code == 302 and "reason=expired" in response.headers["Location"]
    page = client.get("/login?reason=expired").get_data(as_text=True)
    assert "12-hour limit" in page and "without activity" not in page


def test_an_idle_operator_is_told_so_by_the_api_too(app: Flask, clock: FakeClock) -> None:
    client = app.test_client()
    sign_in(client)
    clock.advance(301)
    answer = client.get("/api/queue", headers=JSON)
    assert answer.status_code == 401 and answer.get_json()["reason"] == "idle"


def test_a_session_ended_on_another_screen_is_not_called_idle(
    app: Flask, clock: FakeClock
) -> None:
    client = app.test_client()
    token = sign_in(client)
    poller, other_tab = copy_of(client, app), copy_of(client, app)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    answer = poller.get("/api/queue", headers=JSON)
    assert answer.status_code == 401 and answer.get_json()["reason"] == "signed_out"
    response = other_tab.get("/")
    assert response.status_code == 302 and "reason=signed_out" in response.headers["Location"]
