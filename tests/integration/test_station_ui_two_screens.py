"""Two station screens on one host in one headless Chromium, as in the demo (127.0.0.1:8801 to
8803): the browser keeps cookies per host, not per port, so both screens' cookies share one
jar. Each screen names its session cookie for itself, so an operator signed in on both can
judge parts on both."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import ReviewItem, StationStore
from station_ui.security import hash_pin
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    launch_chromium,
    station_ui_server,
    wait_for,
)

BADGE = "1001"  # the demo's operator, on every station
PIN = "2468"
PART = "P-1"
JPEG = b"\xff\xd8\xff\xe0" + b"part-image" * 10 + b"\xff\xd9"

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.timeout(120),
]


@contextlib.contextmanager
def station_screen(data_dir: Path, secret: bytes) -> Iterator[tuple[str, StationStore]]:
    """A station's UI on a free port of 127.0.0.1, with its own store, key and one part."""
    store = StationStore(data_dir)
    store.upsert_operator(BADGE, "Robin Line", "operator", hash_pin(PIN))
    store.add_review(ReviewItem(
        part_id=PART, created=datetime.now(UTC), reason="operator_decides", automation="assist",
        suggestion="defect", confidence=0.62, model_label="defect", candidate_label=None,
        active_version="1.0.0", candidate_version=None, image_jpeg=JPEG,
    ))
    try:
        with station_ui_server(store, secret) as base:
            yield base, store
    finally:
        store.close()


def outcome_of(store: StationStore) -> str | None:
    row = store.review(PART)
    return row.outcome if row is not None else None


def test_an_operator_signed_in_on_two_screens_of_one_host_judges_on_both(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with (
        station_screen(tmp_path / "press-01", b"press-01-secret!" * 2) as (first_url, first),
        station_screen(tmp_path / "press-02", b"press-02-secret!" * 2) as (second_url, second),
        sync_playwright() as playwright,
    ):
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            pages: list[Any] = []
            for url in (first_url, second_url):
                page = context.new_page()
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.set_default_timeout(10_000)
                page.goto(f"{url}/login")
                page.fill("#badge", BADGE)
                page.fill("#pin", PIN)
                page.click(".keypad-go")
                page.wait_for_selector(f"#current[data-part-id='{PART}']")
                pages.append(page)
            sessions = {c["name"] for c in context.cookies() if c["domain"] == "127.0.0.1"}
            assert len(sessions) == 2, f"the two screens share one session cookie: {sessions}"

            # signing in on the second screen did not sign the operator out of the first
            for page, store, outcome in ((pages[0], first, "reject"), (pages[1], second, "pass")):
                page.click(f"#current button[value={outcome}]")
                wait_for(lambda s=store, o=outcome: outcome_of(s) == o, 10,
                         f"the {outcome} verdict to be stored")
            for page in pages:
                page.reload()
                assert "/login" not in page.url
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
