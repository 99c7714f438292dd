"""In headless Chromium: a screen whose queue cannot be refreshed says so on the screen, and
the warning goes once the store answers again."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

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

BADGE = "op-52"
PIN = "2468"
STALE = "[data-kind=screen_stale]"

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.timeout(120),
]


def test_a_queue_that_cannot_be_read_is_shown_as_not_up_to_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright
    from werkzeug.serving import make_server

    from station_ui.app import create_app
    from station_ui.config import UiConfig

    store = StationStore(tmp_path / "station")
    store.upsert_operator(BADGE, "Ola Line", "operator", hash_pin(PIN))
    config = UiConfig(data_dir=store.data_dir, secret_key=b"stale-screen-key" * 2,
                      poll_interval_ms=300)
    server = make_server("127.0.0.1", 0, create_app(config, store), threaded=True)
    real_pending = store.pending_reviews

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    problems: list[str] = []
    try:
        with _serving(server, "station-ui") as base, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = watched_page(browser, problems)
                sign_in(page, base, BADGE, PIN)
                page.wait_for_selector("[data-queue]")
                assert page.query_selector(STALE) is None
                monkeypatch.setattr(store, "pending_reviews", locked)
                page.wait_for_selector(STALE)
                stale = page.text_content(STALE) or ""
                monkeypatch.setattr(store, "pending_reviews", real_pending)
                page.wait_for_selector(STALE, state="detached")
            finally:
                browser.close()
    finally:
        store.close()
    assert stale.startswith("This screen is not up to date:"), stale
    assert "database is locked" in stale and "Try again in a moment" in stale, stale
    # Chromium logs each poll the server refused; anything else is a fault.
    unexpected = [problem for problem in problems if "status of 503" not in problem]
    assert unexpected == [], f"the browser reported errors: {unexpected}"
