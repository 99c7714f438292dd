"""What the supervisor's page says of an automation request made on the screen: waiting until
the station has made and saved the change (which takes the request), then no longer."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from edge_agent.store import StationStore
from station_ui.security import hash_pin
from tests.unit.test_station_ui import SUPERVISOR_PIN, FakeClock, make_app, sign_in


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    opened = StationStore(tmp_path / "data")
    opened.upsert_operator("sup-1", "Sam Supervisor", "supervisor", hash_pin(SUPERVISOR_PIN))
    yield opened
    opened.close()


@pytest.fixture
def client(store: StationStore) -> FlaskClient:
    return make_app(store, FakeClock()).test_client()


def waiting_section(page: str) -> str:
    found = re.search(r'<div class="requests-waiting".*?</div>', page, re.DOTALL)
    return html.unescape(found.group(0)) if found else ""


def test_a_request_shows_as_waiting_until_the_station_has_saved_its_change(
    client: FlaskClient, store: StationStore
) -> None:
    store.save_status({"automation": "partial", "automation_note": ""})
    token = sign_in(client, "sup-1", SUPERVISOR_PIN)
    assert waiting_section(client.get("/supervisor").get_data(as_text=True)) == ""
    done = client.post(
        "/supervisor/automation",
        data={"level": "full", "reason": "audited for a week", "csrf_token": token},
        follow_redirects=True,
    )
    page = done.get_data(as_text=True)
    assert done.status_code == 200
    assert "until then it is listed as waiting" in html.unescape(page)
    waiting = waiting_section(page)
    assert "full" in waiting and "sup-1" in waiting and "audited for a week" in waiting, waiting
    assert "not saved by the station yet" in waiting
    # The station makes the change, but its save fails (a full disk): still waiting.
    store.save_status({"automation": "full", "automation_note": "full by sup-1: audited"})
    page = client.get("/supervisor").get_data(as_text=True)
    assert "full" in waiting_section(page)
    # The save that carries the change takes the request.
    [request] = store.open_requests()
    store.save_slots({"automation": "full"}, requests=[request.id])
    assert waiting_section(client.get("/supervisor").get_data(as_text=True)) == ""
