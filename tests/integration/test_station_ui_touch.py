"""The touch and keyboard flow in headless Chromium: a tap meant for the part on screen never
judges the part that replaces it."""

from __future__ import annotations

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
    watched_page,
)

BADGE = "op-31"
PIN = "1357"
JPEG = b"\xff\xd8\xff\xe0" + b"part-image" * 10 + b"\xff\xd9"

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.timeout(120),
]


@pytest.fixture
def screen(tmp_path: Path) -> Iterator[tuple[str, StationStore]]:
    store = StationStore(tmp_path / "station")
    store.upsert_operator(BADGE, "Robin Line", "operator", hash_pin(PIN))
    try:
        with station_ui_server(store, b"touch-test-key!!" * 2) as base:
            yield base, store
    finally:
        store.close()


def queue_parts(store: StationStore, *part_ids: str) -> None:
    for part_id in part_ids:
        store.add_review(ReviewItem(
            part_id=part_id, created=datetime.now(UTC), reason="operator_decides",
            automation="assist", suggestion="ok", confidence=0.7, model_label="ok",
            candidate_label=None, active_version="1.0.0", candidate_version=None,
            image_jpeg=JPEG,
        ))


def outcome(store: StationStore, part_id: str) -> str | None:
    row = store.review(part_id)
    return row.outcome if row is not None else None


def signed_in_page(browser: Any, base: str, problems: list[str]) -> Any:
    page = watched_page(browser, problems)
    page.goto(f"{base}/")
    page.fill("#badge", BADGE)
    page.fill("#pin", PIN)
    page.click(".keypad-go")
    page.wait_for_selector("#current .part-id")
    return page


def shown(page: Any) -> str:
    return str(page.get_attribute("#current", "data-part-id") or "")


@pytest.mark.parametrize("gap_ms", [120, 250])
def test_a_double_tap_judges_only_the_part_it_was_meant_for(
    screen: tuple[str, StationStore], gap_ms: int
) -> None:
    """The second tap of a double tap on Pass comes after the next card has slid in under the
    finger: it must not pass a part the operator has not looked at."""
    from playwright.sync_api import sync_playwright

    base, store = screen
    queue_parts(store, "A-1", "B-2")
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = signed_in_page(browser, base, problems)
            assert shown(page) == "A-1"
            box = page.locator("#current button[value=pass]").bounding_box()
            assert box is not None
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.click(x, y)
            page.wait_for_timeout(gap_ms)
            page.mouse.click(x, y)
            page.wait_for_function("() => document.getElementById('current')"
                                   ".dataset.partId === 'B-2'")
            page.wait_for_timeout(1000)
            assert outcome(store, "A-1") == "pass"
            assert outcome(store, "B-2") is None, "the second tap judged the next part"

            # A moment later the new card takes taps and keys as usual.
            page.keyboard.press("r")
            wait_for(lambda: outcome(store, "B-2") == "reject", 10, "the verdict for B-2")
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"


def test_a_key_pressed_twice_judges_one_part(screen: tuple[str, StationStore]) -> None:
    from playwright.sync_api import sync_playwright

    base, store = screen
    queue_parts(store, "A-1", "B-2")
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = signed_in_page(browser, base, problems)
            page.keyboard.press("p")
            page.wait_for_function("() => document.getElementById('current')"
                                   ".dataset.partId === 'B-2'")
            page.keyboard.press("p")  # bounced: the card came in a moment ago
            page.wait_for_timeout(1000)
            assert (outcome(store, "A-1"), outcome(store, "B-2")) == ("pass", None)
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"


def test_keys_that_are_no_shortcut_judge_nothing_and_raise_no_error(
    screen: tuple[str, StationStore],
) -> None:
    from playwright.sync_api import sync_playwright

    base, store = screen
    queue_parts(store, "A-1")
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = signed_in_page(browser, base, problems)
            page.wait_for_timeout(700)  # past the new card's hold
            for key in ('"', "\\", "]", "x"):
                page.keyboard.press(key)
            page.wait_for_timeout(300)
            assert outcome(store, "A-1") is None
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
