"""In headless Chromium: when the page finds its sign-in over, the sign-in page says why."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_agent.store import StationStore
from station_ui.security import hash_pin
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    _serving,
    launch_chromium,
    sign_in,
    watched_page,
)

BADGE = "op-41"
PIN = "2468"

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.timeout(120),
]


class SteppedClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_busy_operator_past_the_sign_in_limit_is_not_told_they_were_idle(
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from station_ui.app import create_app
    from station_ui.config import UiConfig

    clock = SteppedClock()
    store = StationStore(tmp_path / "station")
    store.upsert_operator(BADGE, "Kim Line", "operator", hash_pin(PIN))
    config = UiConfig(
        data_dir=store.data_dir, secret_key=b"reason-test-key!" * 2, idle_timeout_s=3000,
        max_session_s=3600, poll_interval_ms=300, clock=clock, monotonic=clock,
    )
    server = make_server("127.0.0.1", 0, create_app(config, store), threaded=True)
    problems: list[str] = []
    try:
        with _serving(server, "station-ui") as base, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = watched_page(browser, problems)
                sign_in(page, base, BADGE, PIN)
                page.wait_for_selector("[data-queue]")
                clock.now += 2000
                page.goto(f"{base}/")  # the operator is busy at the screen
                page.wait_for_selector("[data-queue]")
                clock.now += 2000  # past the hour the sign-in may last, not idle
                page.wait_for_url("**/login?reason=*")
                notice = page.text_content(".notice") or ""
            finally:
                browser.close()
    finally:
        store.close()
    assert "1-hour limit" in notice and "without activity" not in notice, notice
    # Chromium logs the poll that found the sign-in over; anything else is a fault.
    unexpected = [problem for problem in problems if "status of 401" not in problem]
    assert unexpected == [], f"the browser reported errors: {unexpected}"
