"""The fleet dashboard in headless Chromium over answers the controller's API can give: the page
is the real one, served by a real controller app; the /api/ answers are set per test (through
Playwright's routing), so a rolled-back rollout that still owes rollbacks, a refused button, a
link to a rollout the controller does not have, or a controller that restarts can be shown
without waiting for a fleet to get there."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deploy.api import create_app
from deploy.config import load_controller_config
from deploy.controller import Controller
from linesight.broker import free_port
from linesight.http_server import HttpServer
from tests.support import HAVE_CHROMIUM, MODELS, NO_CHROMIUM, launch_chromium, watched_page

pytestmark = [pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
              pytest.mark.timeout(120)]

ROLLOUT_ID = "r-20250101-120000-abc123"
NOW = datetime.now(UTC)


def _rollout(phase: str = "running", phase_detail: str | None = None,
             **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "rollout_id": ROLLOUT_ID, "plan": "two-stage", "phase": phase,
        "phase_detail": phase_detail or phase,
        "candidate": {"name": "part-classifier", "version": "2.0.0", "sha256": "0" * 64},
        "stage": 0, "reason": "", "touched": ["st-1", "st-2"],
        "stages": [
            {"index": 0, "name": "shadow on st-1", "mode": "shadow", "stations": ["st-1"],
             "status": "running", "gate": None},
            {"index": 1, "name": "promote on both", "mode": "promote",
             "stations": [], "status": "pending", "gate": None},
        ],
        "started": (NOW - timedelta(minutes=5)).isoformat(),
        "updated": NOW.isoformat(),
        "pending_commands": [], "rollbacks_owed": [],
        "history": [f"{NOW.isoformat()} started by api"],
        "evidence": None, "deadline": None,
    }
    document.update(extra)
    return document


def _station(
    name: str, online: bool = True, clock_behind_s: float | None = 0.2
) -> dict[str, Any]:
    return {"station": name, "online": online, "last_seen": NOW.isoformat(), "labels": {},
            "clock_behind_s": clock_behind_s, "state": None, "metrics": None}


class FakeApi:
    """The answers the page gets under /api/; `answer` can be replaced per path."""

    def __init__(self, rollout: dict[str, Any] | None) -> None:
        self.rollout = rollout
        self.down = False
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.post_answer: tuple[int, dict[str, Any]] = (200, rollout or {})
        self.missing: set[str] = set()
        self.stations = [_station("st-1"), _station("st-2", online=False)]

    def answer(self, path: str, method: str, body: str | None) -> tuple[int, Any]:
        if method == "POST":
            self.posted.append((path, json.loads(body or "{}")))
            return self.post_answer
        if path in self.missing:
            return 404, {"error": f"no rollout {path.rsplit('/', 1)[-1]}"}
        if path == "/api/health":
            rid = self.rollout["rollout_id"] if self.rollout else None
            return 200, {"broker_connected": True, "ingest": {}, "rollout": rid}
        if path == "/api/stations":
            return 200, {"stations": self.stations}
        if path == "/api/series":
            return 200, {"points": []}
        if path == "/api/rollouts":
            return 200, {"rollouts": []}
        if path.endswith("/plan"):
            return 200, {"rollout_id": ROLLOUT_ID, "plan": {"stages": [{}, {}]}}
        if path.startswith("/api/rollouts/") and self.rollout:
            return 200, self.rollout
        return 404, {"error": "not found"}

    def route(self, route: Any) -> None:
        request = route.request
        if self.down:
            route.abort("connectionrefused")
            return
        path = request.url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
        status, document = self.answer("/" + path, request.method, request.post_data)
        route.fulfill(status=status, content_type="application/json", body=json.dumps(document))


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real dashboard page, served by a controller app that is not started (its API is
    never reached: the tests answer /api/ themselves)."""
    root: Path = tmp_path_factory.mktemp("dashboard")
    controller = Controller(load_controller_config(None, {
        "broker.url": f"mqtt://127.0.0.1:{free_port()}", "data_dir": root / "fleet",
        "bundles": MODELS,
    }))
    port = free_port()
    server = HttpServer(create_app(controller), "127.0.0.1", port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        controller.stop()


@pytest.fixture
def browse(page_url: str) -> Iterator[Callable[[FakeApi, str], Any]]:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            def open_page(api: FakeApi, path: str = "/") -> Any:
                page = watched_page(browser, problems)
                page.route("**/api/**", api.route)
                page.goto(page_url + path)
                page.wait_for_function("() => document.body.dataset.refreshed"
                                       " || !document.getElementById('banner').hidden")
                return page

            yield open_page
        finally:
            browser.close()
    # The browser itself logs a refused connection, and an answer of 4xx, as a console error.
    real = [p for p in problems if "ERR_CONNECTION_REFUSED" not in p
            and "the server responded with a status of 4" not in p]
    assert real == [], f"the browser reported errors: {real}"


def test_a_rolled_back_rollout_names_the_stations_that_still_owe_their_rollback(
    browse: Callable[[FakeApi, str], Any],
) -> None:
    api = FakeApi(_rollout("rolled_back", reason="gate failed", rollbacks_owed=["st-2"]))
    page = browse(api, "/")
    assert page.inner_text("#phase").strip().lower() == "rolled back"
    owed = page.inner_text("#pending")
    assert "st-2" in owed and "rollback" in owed.lower(), owed


def test_a_station_clock_off_by_more_than_a_minute_is_shown_either_way(
    browse: Callable[[FakeApi, str], Any],
) -> None:
    api = FakeApi(None)
    api.stations = [
        _station("behind", clock_behind_s=3 * 3600 + 12 * 60 + 5),
        _station("ahead", clock_behind_s=-5 * 60 - 10),
        _station("years", clock_behind_s=400 * 86400),
        _station("close", clock_behind_s=59.0),
        _station("unknown", clock_behind_s=None),
    ]
    page = browse(api, "/")
    notes = {
        station: page.locator(f"tr[data-station={station}] .clock-off").all_inner_texts()
        for station in ("behind", "ahead", "years", "close", "unknown")
    }
    assert notes == {
        "behind": ["clock 3 h 12 min behind"], "ahead": ["clock 5 min ahead"],
        "years": ["clock 400 days behind"], "close": [], "unknown": [],
    }
    title = page.get_attribute("tr[data-station=behind] .clock-off", "title") or ""
    assert "time source (NTP)" in title


def test_a_refused_button_says_why(browse: Callable[[FakeApi, str], Any]) -> None:
    api = FakeApi(_rollout("running"))
    page = browse(api, "/")
    page.wait_for_function("() => !document.querySelector('[data-action=pause]').disabled")
    cases = [
        (401, {"error": "a valid API token is required (Authorization: Bearer ...)"}, "token"),
        (403, {"error": "requests for host 'fleet:8700' are refused"}, "fleet:8700"),
        (409, {"error": "nothing to approve: the rollout is paused"}, "nothing to approve"),
    ]
    for status, answer, expected in cases:
        api.post_answer = (status, answer)
        page.click("#controls [data-action=pause]")
        page.wait_for_function("(t) => document.getElementById('action-result').textContent"
                               ".includes(t)", arg=expected)
        assert "bad" in (page.get_attribute("#action-result", "class") or "")
    assert api.posted and all(body["by"] == "dashboard" for _, body in api.posted)


def test_the_page_recovers_when_the_controller_restarts(
    browse: Callable[[FakeApi, str], Any],
) -> None:
    api = FakeApi(_rollout("running"))
    page = browse(api, "/")
    api.down = True
    page.wait_for_selector("#banner:not([hidden])")
    assert "not answering" in page.inner_text("#banner")
    api.down = False
    page.wait_for_selector("#banner[hidden]", state="attached")
    assert page.inner_text("#phase").strip().lower() == "running"


def test_a_link_to_an_unknown_rollout_says_so_and_still_shows_the_fleet(
    browse: Callable[[FakeApi, str], Any],
) -> None:
    api = FakeApi(_rollout("running"))
    api.missing.add("/api/rollouts/r-unknown")
    page = browse(api, "/rollouts/r-unknown")
    page.wait_for_function(
        "() => document.querySelectorAll('#stations tr[data-station]').length === 2")
    text = page.inner_text("#rollout-none") + page.inner_text("#banner")
    assert "r-unknown" in text
    assert "not answering" not in page.inner_text("#banner")
