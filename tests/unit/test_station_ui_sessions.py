"""Sign-out revokes the session on the server: a copy of the cookie is worth nothing after it."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge_agent.store import StationStore
from station_ui.sessions import SESSIONS_FILE, LiveSessions
from tests.unit.test_station_ui import (
    _HASHES,
    OPERATOR_PIN,
    FakeClock,
    make_app,
    sign_in,
)

JSON = {"Accept": "application/json"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = StationStore(tmp_path / "data")
    opened.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    yield opened
    opened.close()


@pytest.fixture
def app(store: StationStore, clock: FakeClock) -> Flask:
    return make_app(store, clock)


def copy_of(client: FlaskClient, app: Flask) -> FlaskClient:
    """Another browser holding a copy of `client`'s session cookie."""
    name = app.config["SESSION_COOKIE_NAME"]
    cookie = client.get_cookie(name)
    assert cookie is not None, "no session cookie to copy"
    other = app.test_client()
    other.set_cookie(name, cookie.value)
    return other


def signed_in(client: FlaskClient) -> bool:
    page = client.get("/")
    api = client.get("/api/queue", headers=JSON).status_code
    if page.status_code == 200 and api == 200:
        return True
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert api == 401
    return False


def sign_out(client: FlaskClient, token: str) -> None:
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302


# --- through the app --------------------------------------------------------------------------


def test_a_cookie_copied_before_sign_out_is_refused_after_it(app: Flask) -> None:
    client = app.test_client()
    token = sign_in(client)
    copy = copy_of(client, app)
    assert signed_in(copy)
    sign_out(client, token)
    assert not signed_in(copy)
    assert not signed_in(client)


def test_an_idle_sign_out_revokes_a_copy_kept_busy(app: Flask, clock: FakeClock) -> None:
    """The screen left alone signs out on its next poll; a copy of its cookie that someone kept
    busy meanwhile (so its own idle clock is fresh) is signed out with it."""
    client = app.test_client()
    sign_in(client)
    copy = copy_of(client, app)
    for _ in range(2):
        clock.advance(200)
        assert signed_in(copy)
    clock.advance(200)  # the screen itself: 600 s without a tap
    assert client.get("/api/queue", headers=JSON).status_code == 401
    assert not signed_in(copy)


def test_a_pin_change_revokes_even_when_changed_back(app: Flask, store: StationStore) -> None:
    client = app.test_client()
    sign_in(client)
    copy = copy_of(client, app)
    store.upsert_operator("op-7", "Ana Operator", "operator", _HASHES["98765"])
    assert not signed_in(client)
    store.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    assert not signed_in(copy)


def test_a_new_sign_in_is_a_new_session(app: Flask) -> None:
    client = app.test_client()
    token = sign_in(client)
    old = copy_of(client, app)
    sign_out(client, token)
    sign_in(client)  # the same operator again, on the same screen
    assert signed_in(client)
    assert not signed_in(old)


def test_a_restart_keeps_live_sessions_and_revoked_ones_stay_revoked(
    store: StationStore, clock: FakeClock
) -> None:
    app = make_app(store, clock)
    ana, bob = app.test_client(), app.test_client()
    ana_token = sign_in(ana)
    sign_in(bob)
    ana_copy = copy_of(ana, app)
    sign_out(ana, ana_token)

    restarted = make_app(store, clock)
    assert signed_in(copy_of(bob, restarted))
    assert not signed_in(copy_of(ana_copy, restarted))


def test_the_record_is_private_to_the_station(app: Flask, store: StationStore) -> None:
    sign_in(app.test_client())
    path = store.data_dir / SESSIONS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [
    b"{not json", b"[1, 2]", b'{"sessions": {"abc": "yesterday"}}', b'{"sessions": [1]}',
    b'{"sessions": {"abc": NaN}}', b'{"sessions": {"abc": true}}', b"\xff\xfe",
])
def test_a_damaged_record_signs_everyone_out_and_says_so(
    store: StationStore, clock: FakeClock, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store, clock)
    client = app.test_client()
    sign_in(client)
    path = store.data_dir / SESSIONS_FILE
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="station_ui.sessions"):
        restarted = make_app(store, clock)
    assert not signed_in(copy_of(client, restarted))
    assert str(path) in caplog.text and "everyone signs in again" in caplog.text
    again = restarted.test_client()
    sign_in(again)  # and the screen works on
    assert signed_in(again)


# --- the record itself ------------------------------------------------------------------------


def test_sessions_past_the_maximum_length_are_refused_and_purged(clock: FakeClock) -> None:
    sessions = LiveSessions(None, clock, max_age_s=100)
    first = sessions.start()
    clock.advance(60)
    second = sessions.start()
    clock.advance(41)
    assert not sessions.is_live(first) and sessions.is_live(second)
    sessions.start()
    assert len(sessions) == 2  # the expired one is gone


def test_the_record_is_bounded(clock: FakeClock) -> None:
    sessions = LiveSessions(None, clock, max_age_s=3600, max_sessions=3)
    started = []
    for _ in range(4):
        started.append(sessions.start())
        clock.advance(1)
    assert len(sessions) == 3
    assert [sessions.is_live(s) for s in started] == [False, True, True, True]


def test_ids_are_fresh_and_only_strings_are_live(clock: FakeClock) -> None:
    sessions = LiveSessions(None, clock, max_age_s=3600)
    ids = {sessions.start() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 32 for i in ids)
    assert not any(sessions.is_live(bad) for bad in (None, 1, "", ["x"]))
    sessions.end(None)  # a cookie without an id: nothing to forget, no error


def test_a_failed_save_removes_the_record_so_a_restart_revives_nothing(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / SESSIONS_FILE
    sessions = LiveSessions(path, clock, max_age_s=3600)
    kept = sessions.start()
    assert json.loads(path.read_text())["sessions"].keys() == {kept}

    def full_disk(*_args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with caplog.at_level(logging.WARNING, logger="station_ui.sessions"):
        sessions.end(kept)
    assert not sessions.is_live(kept)
    assert not path.exists()
    assert not list(tmp_path.iterdir()), "a temporary file was left behind"
    assert "No space left" in caplog.text and str(path) in caplog.text
    assert not LiveSessions(path, clock, max_age_s=3600).is_live(kept)
