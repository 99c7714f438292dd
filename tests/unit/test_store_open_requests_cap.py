"""The screen's requests wait in the store until the station has made and saved them; with the
station stopped, stuck or unable to save, a supervisor (or a script with a supervisor's sign-in)
could add them without end, each one a durable save the station would make in turn on its
inspection loop. They are capped, and the requester is told why."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import MAX_OPEN_REQUESTS, StationStore, TooManyOpenRequests

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_data_dir: Path) -> Iterator[StationStore]:
    with StationStore(tmp_data_dir) as opened:
        yield opened


def test_open_requests_are_capped_with_a_message_for_the_requester(store: StationStore) -> None:
    asked = [store.request_automation("full", f"try {n}", by="9001")
             for n in range(MAX_OPEN_REQUESTS)]
    with pytest.raises(TooManyOpenRequests) as refused:
        store.request_automation("partial", "one more", by="9001")
    message = str(refused.value)
    assert f"{MAX_OPEN_REQUESTS} requests from the screen are still waiting" in message
    assert [r.id for r in store.open_requests()] == asked, "the refused one is not stored"
    store.save_slots({"active": "x"}, requests=asked[:1])  # the station made the oldest
    store.request_automation("partial", "one more", by="9001")
    assert len(store.open_requests()) == MAX_OPEN_REQUESTS


def test_the_supervisor_is_told_why_a_request_past_the_cap_is_not_recorded(
    tmp_path: Path,
) -> None:
    from station_ui.security import hash_pin
    from tests.unit.test_station_ui import SUPERVISOR_PIN, FakeClock, make_app, sign_in

    with StationStore(tmp_path / "data") as screen:
        screen.upsert_operator("sup-1", "Sam", "supervisor", hash_pin(SUPERVISOR_PIN))
        for n in range(MAX_OPEN_REQUESTS):
            screen.request_automation("full", f"try {n}", by="sup-1")
        client = make_app(screen, FakeClock()).test_client()
        token = sign_in(client, "sup-1", SUPERVISOR_PIN)
        answer = client.post("/supervisor/automation",
                             data={"level": "assist", "reason": "night", "csrf_token": token})
        page = html.unescape(answer.get_data(as_text=True))
        assert answer.status_code == 409
        assert "Not recorded: 20 requests from the screen are still waiting" in page
        assert "busy or failing" not in page
        assert len(screen.open_requests()) == MAX_OPEN_REQUESTS
