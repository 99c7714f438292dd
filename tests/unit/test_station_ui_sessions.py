"""Sign-out revokes the session on the server: a copy of the cookie is worth nothing after it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge_agent.store import DEFAULT_BUSY_TIMEOUT_S, StationStore
from station_ui.sessions import LiveSessions
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


def open_store(data_dir: Path, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> StationStore:
    opened = StationStore(data_dir, busy_timeout_s=busy_timeout_s)
    opened.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    return opened


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = open_store(tmp_path / "data")
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


def test_two_screens_on_one_data_dir_see_each_others_sign_outs(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Two UI processes on one data dir (each with its own store connection, as two processes
    have) accept each other's cookies, so they must share sign-outs, and keep them across a
    restart of either."""
    data_dir = tmp_path / "data"
    with open_store(data_dir) as store_a, StationStore(data_dir) as store_b:
        screen_a, screen_b = make_app(store_a, clock), make_app(store_b, clock)
        browser = screen_a.test_client()
        token = sign_in(browser)
        on_b = copy_of(browser, screen_b)
        assert signed_in(on_b)

        sign_out(browser, token)
        assert not signed_in(copy_of(on_b, screen_b))
        sign_in(screen_b.test_client())  # someone else signs in on B
        with StationStore(data_dir) as store_a2:
            restarted_a = make_app(store_a2, clock)
            assert not signed_in(copy_of(on_b, restarted_a))


def test_a_restart_keeps_a_live_session_on_either_screen(tmp_path: Path, clock: FakeClock) -> None:
    data_dir = tmp_path / "data"
    with open_store(data_dir) as store_a, StationStore(data_dir) as store_b:
        browser = make_app(store_a, clock).test_client()
        sign_in(browser)
        assert signed_in(copy_of(browser, make_app(store_b, clock)))


def test_the_previous_builds_session_file_is_removed_at_start(
    store: StationStore, clock: FakeClock
) -> None:
    old = store.data_dir / "ui-sessions.json"
    old.write_text('{"sessions": {"an-old-id": 0}}')
    client = make_app(store, clock).test_client()
    assert not old.exists()
    sign_in(client)
    assert signed_in(client)


def test_a_sign_out_the_store_cannot_record_still_signs_this_browser_out(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The store stays locked past its busy timeout (another writer, a stalled disk): the
    sign-out answers as usual and clears the cookie, and says what went wrong."""
    with open_store(tmp_path / "data", busy_timeout_s=0.1) as store:
        app = make_app(store, clock)
        client = app.test_client()
        token = sign_in(client)
        writer = sqlite3.connect(store.path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            with caplog.at_level(logging.WARNING, logger="station_ui.sessions"):
                sign_out(client, token)
            assert not signed_in(client)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    assert "cannot end a session" in caplog.text and "database is locked" in caplog.text


@pytest.mark.parametrize("breakage", ["closed", "table gone"])
def test_a_cookie_the_store_cannot_check_is_refused(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, breakage: str
) -> None:
    store = open_store(tmp_path / "data")
    app = make_app(store, clock)
    client = app.test_client()
    sign_in(client)
    if breakage == "closed":
        store.close()
    else:
        raw = sqlite3.connect(store.path)
        raw.execute("DROP TABLE ui_sessions")
        raw.commit()
        raw.close()
    with caplog.at_level(logging.WARNING, logger="station_ui.sessions"):
        assert client.get("/api/queue", headers=JSON).status_code == 401
    assert "cannot check a session" in caplog.text and "the cookie is refused" in caplog.text
    store.close()


# --- the record itself ------------------------------------------------------------------------


def test_sessions_past_the_maximum_length_are_refused_and_purged(
    store: StationStore, clock: FakeClock
) -> None:
    sessions = LiveSessions(store, clock, max_age_s=100)
    first = sessions.start()
    clock.advance(60)
    second = sessions.start()
    clock.advance(41)
    assert not sessions.is_live(first) and sessions.is_live(second)
    sessions.start()
    assert store.ui_session_count() == 2  # the expired one is gone


def test_the_record_is_bounded(store: StationStore, clock: FakeClock) -> None:
    sessions = LiveSessions(store, clock, max_age_s=3600, max_sessions=3)
    started = []
    for _ in range(4):
        started.append(sessions.start())
        clock.advance(1)
    assert store.ui_session_count() == 3
    assert [sessions.is_live(s) for s in started] == [False, True, True, True]


def test_ids_are_fresh_and_only_strings_are_live(store: StationStore, clock: FakeClock) -> None:
    sessions = LiveSessions(store, clock, max_age_s=3600)
    ids = {sessions.start() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 32 for i in ids)
    assert not any(sessions.is_live(bad) for bad in (None, 1, "", ["x"], "not-an-id"))
    sessions.end(None)  # a cookie without an id: nothing to forget, no error
    sessions.end("not-an-id")
    assert store.ui_session_count() == 50


def test_a_session_length_must_be_positive(store: StationStore, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="max_age_s: must be positive, got 0"):
        LiveSessions(store, clock, max_age_s=0)
