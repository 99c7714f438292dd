"""The station screen when the PC's wall clock is stepped: NTP correcting it after boot, an RTC
reset to 2000 by a flat CMOS battery, a clock set to local time read as UTC. Sign-in locks, idle
sign-out and the sign-in's time limit measure durations, so a step of the wall clock must
neither lengthen them nor end them at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from edge_agent.store import StationStore
from tests.unit.test_station_ui import (
    OPERATOR_PIN,
    FakeClock,
    _try,
    banner_kinds,
    csrf_of,
    make_app,
    sign_in,
    status_doc,
)
from tests.unit.test_station_ui_sessions import open_store

HOUR = 3600.0
YEAR_2000 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = open_store(tmp_path / "data")
    yield opened
    opened.close()


def _lock_badge(client: FlaskClient) -> None:
    assert [_try(client, "op-7", "1111") for _ in range(5)] == [401, 401, 401, 401, 429]


def _wait_page(client: FlaskClient) -> str:
    return client.post(
        "/login", data={"badge": "op-7", "pin": "1", "csrf_token": csrf_of(client)}
    ).get_data(as_text=True)


# --- sign-in locks ---------------------------------------------------------------------------


def test_a_clock_stepped_back_an_hour_does_not_lock_a_badge_for_an_hour(
    store: StationStore,
) -> None:
    wall = FakeClock()
    # Only the wall clock is the test's: the lock runs on the real monotonic clock.
    client = make_app(store, wall, monotonic=None).test_client()
    _lock_badge(client)
    wall.advance(-HOUR)  # NTP steps a clock that ran an hour ahead back
    page = _wait_page(client)
    assert "Try again in 30 s" in page or "Try again in 29 s" in page, page


def test_a_lock_ends_after_its_30_s_whatever_the_wall_clock_does(store: StationStore) -> None:
    wall, mono = FakeClock(), FakeClock()
    client = make_app(store, wall, monotonic=mono).test_client()
    _lock_badge(client)
    wall.now = YEAR_2000  # the RTC read 2000; NTP had set it right meanwhile
    mono.advance(31)
    assert _try(client, "op-7", OPERATOR_PIN) == 302


# --- idle sign-out and the sign-in's time limit ---------------------------------------------


def test_a_clock_stepped_forward_signs_nobody_out(store: StationStore) -> None:
    """A clock set to local time (UTC-8) read as UTC, corrected by NTP while an operator is
    signed in."""
    wall = FakeClock()
    client = make_app(store, wall, monotonic=None).test_client()
    sign_in(client)
    wall.advance(8 * HOUR)
    assert client.get("/api/queue").status_code == 200
    assert client.get("/").status_code == 200


def test_a_forward_step_past_the_12_hours_ends_every_sign_in_once(store: StationStore) -> None:
    """An RTC that read 2000 at boot, corrected by NTP: the store's record of sign-ins is dated
    by the wall clock (the one record of every screen, kept across restarts), so by it every
    sign-in is past its limit. They end: the operators sign in again."""
    wall, mono = FakeClock(), FakeClock()
    wall.now = YEAR_2000 + HOUR
    client = make_app(store, wall, monotonic=mono).test_client()
    sign_in(client)
    wall.now = datetime(2026, 3, 2, 7, 30, tzinfo=UTC).timestamp()
    mono.advance(60)
    response = client.get("/api/queue")
    assert response.status_code == 401 and response.get_json()["reason"] == "signed_out"
    sign_in(client)
    assert client.get("/api/queue").status_code == 200


def test_an_operator_who_walks_away_is_signed_out_though_the_clock_went_back(
    store: StationStore,
) -> None:
    """A clock set to local time (UTC+8) read as UTC, stepped back by NTP just after the
    operator's last tap: the screen signs out after its 5 minutes all the same."""
    wall, mono = FakeClock(), FakeClock()
    client = make_app(store, wall, monotonic=mono).test_client()
    sign_in(client)
    wall.advance(-8 * HOUR)
    polls = []
    for _ in range(4):  # the open page polls on its own
        wall.advance(100)
        mono.advance(100)
        polls.append(client.get("/api/queue"))
    assert [poll.status_code for poll in polls] == [200, 200, 200, 401]
    assert polls[3].get_json()["reason"] == "idle"


def test_the_time_limit_counts_the_time_signed_in_not_the_wall_clock(
    store: StationStore,
) -> None:
    wall, mono = FakeClock(), FakeClock()
    client = make_app(store, wall, monotonic=mono, max_session_s=HOUR).test_client()
    sign_in(client)
    wall.advance(-8 * HOUR)
    for _ in range(15):  # busy: a tap every four minutes for the hour
        wall.advance(240)
        mono.advance(240)
        assert client.get("/").status_code == 200
    mono.advance(60)
    wall.advance(60)
    response = client.get("/api/queue")
    assert response.status_code == 401 and response.get_json()["reason"] == "expired"


def test_after_a_reboot_into_2000_the_previous_operator_is_signed_out(
    store: StationStore,
) -> None:
    """The kiosk's browser keeps its cookie across a reboot; the RTC lost its time and reads
    2000, so nothing tells how long ago the last tap was: the screen signs out."""
    wall, mono = FakeClock(), FakeClock()
    before = make_app(store, wall, monotonic=mono, boot_id="boot-1")
    client = before.test_client()
    sign_in(client)
    wall.now, mono.now = YEAR_2000, 12.0  # a new boot: its monotonic clock starts again
    after = make_app(store, wall, monotonic=mono, boot_id="boot-2")
    client.application = after  # the same browser, the UI process of the new boot
    response = client.get("/api/queue")
    assert response.status_code == 401 and response.get_json()["reason"] == "idle"


def test_after_a_quick_reboot_with_a_good_clock_the_operator_stays_signed_in(
    store: StationStore,
) -> None:
    wall, mono = FakeClock(), FakeClock()
    client = make_app(store, wall, monotonic=mono, boot_id="boot-1").test_client()
    sign_in(client)
    wall.advance(90)
    mono.now = 20.0
    client.application = make_app(store, wall, monotonic=mono, boot_id="boot-2")
    assert client.get("/api/queue").status_code == 200
    wall.advance(301)
    mono.advance(301)
    assert client.get("/api/queue").status_code == 401


# --- the store's record of live sign-ins ------------------------------------------------------


def test_a_sign_in_after_the_clock_went_back_is_not_the_one_evicted(
    store: StationStore,
) -> None:
    """Past the most live sign-ins the store keeps, the oldest sign-in ends, not the one just
    made because its wall time reads earlier than those made before the step."""
    now = datetime(2026, 3, 2, 7, 30, tzinfo=UTC)
    for n in range(3):
        store.start_ui_session(f"before-{n}-" + "x" * 30, now, timedelta(hours=12), 3)
    back = now - timedelta(hours=8)
    store.start_ui_session("after-step-" + "x" * 30, back, timedelta(hours=12), 3)
    assert store.ui_session_live("after-step-" + "x" * 30, back, timedelta(hours=12))
    assert not store.ui_session_live("before-0-" + "x" * 30, back, timedelta(hours=12))


# --- the banner of an agent that stopped ------------------------------------------------------


def test_an_agent_that_stopped_is_shown_as_stopped_though_the_clock_went_back(
    store: StationStore,
) -> None:
    """The snapshot is dated by the wall clock; stepped back eight hours after the agent's last
    one, it would read as written in eight hours' time and the screen would call a dead agent
    running all that while."""
    wall, mono = FakeClock(), FakeClock()
    client = make_app(store, wall, monotonic=mono).test_client()
    sign_in(client)
    store.save_status(status_doc())  # the agent's last snapshot before it stopped
    assert banner_kinds(client) == []
    wall.advance(-8 * HOUR)
    assert banner_kinds(client) == []
    wall.advance(6)
    mono.advance(6)
    assert banner_kinds(client) == ["agent_down"]
    store.save_status(status_doc())  # running again
    assert banner_kinds(client) == []
