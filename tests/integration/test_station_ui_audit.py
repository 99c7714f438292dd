"""In headless Chromium: a verdict tapped while the station's store is locked is shown as not
recorded, the part stays on screen, and the same tap records it once the store answers."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.store import ReviewItem, StationStore
from station_ui.security import hash_pin
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    launch_chromium,
    sign_in,
    station_ui_server,
    watched_page,
)

BADGE = "op-64"
PIN = "8642"
JPEG = b"\xff\xd8\xff\xe0" + b"part-image" * 10 + b"\xff\xd9"
TOAST = "#toast:not([hidden])"
REJECT = "#current button[value=reject]:not([disabled])"

# Every text the toast shows, in order: one may replace another faster than a test can look.
RECORD_TOASTS = """() => {
  window.toastsSeen = [];
  const box = document.getElementById("toast");
  new MutationObserver(() => {
    const text = box.textContent;
    if (!box.hidden && window.toastsSeen[window.toastsSeen.length - 1] !== text) {
      window.toastsSeen.push(text);
    }
  }).observe(box, { childList: true, characterData: true, subtree: true, attributes: true });
}"""

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.timeout(120),
]


def test_a_verdict_tapped_while_the_store_is_locked_says_not_recorded_and_counts_once_retried(
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    # A short busy timeout: the screen gives up on the locked store in a fraction of a second.
    store = StationStore(tmp_path / "station", busy_timeout_s=0.2)
    store.upsert_operator(BADGE, "Kim Line", "operator", hash_pin(PIN))
    for part_id in ("P-1", "P-2"):
        store.add_review(ReviewItem(
            part_id=part_id, created=datetime.now(UTC), reason="operator_decides",
            automation="assist", suggestion="ok", confidence=0.7, model_label="ok",
            candidate_label=None, active_version="1.0.0", candidate_version=None,
            image_jpeg=JPEG,
        ))
    problems: list[str] = []
    try:
        with station_ui_server(store, b"audit-screen-key" * 2) as base, \
                sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = watched_page(browser, problems)
                sign_in(page, base, BADGE, PIN)
                page.wait_for_selector("#current[data-part-id='P-1']")
                # Another writer holds the store (the agent stuck on a stalled disk).
                writer = sqlite3.connect(store.path, isolation_level=None)
                writer.execute("BEGIN IMMEDIATE")
                try:
                    page.click(REJECT)
                    refused = page.wait_for_selector(TOAST).text_content() or ""
                    still_shown = page.get_attribute("#current", "data-part-id")
                    unsaved = store.review("P-1")
                finally:
                    writer.execute("ROLLBACK")
                    writer.close()
                page.click(REJECT)
                page.wait_for_selector("#current[data-part-id='P-2']")
            finally:
                browser.close()
    finally:
        judged = store.review("P-1")
        verdicts = store.verdicts_since(datetime(2000, 1, 1, tzinfo=UTC))
        store.close()
    assert refused.startswith("Not recorded"), refused
    assert "database is locked" in refused and "Nothing was saved" in refused, refused
    assert still_shown == "P-1"
    assert unsaved is not None and unsaved.outcome is None
    assert judged is not None and judged.outcome == "reject"
    assert [(v.part_id, v.operator, v.outcome) for v in verdicts] == [("P-1", BADGE, "reject")]
    # Chromium logs the refused request (503); anything else is a fault.
    unexpected = [problem for problem in problems if "status of 503" not in problem]
    assert unexpected == [], f"the browser reported errors: {unexpected}"


def test_a_verdict_whose_answer_is_lost_says_it_may_not_be_recorded_and_counts_once(
    tmp_path: Path,
) -> None:
    """The station saved the verdict, but the connection went before its answer reached the
    screen: the screen cannot know, so it must not say "Not recorded" as if certain; the part
    counts once, and the screen moves on to the next part."""
    from playwright.sync_api import Route, sync_playwright

    store = StationStore(tmp_path / "station")
    store.upsert_operator(BADGE, "Kim Line", "operator", hash_pin(PIN))
    for part_id in ("P-1", "P-2"):
        store.add_review(ReviewItem(
            part_id=part_id, created=datetime.now(UTC), reason="operator_decides",
            automation="assist", suggestion="ok", confidence=0.7, model_label="ok",
            candidate_label=None, active_version="1.0.0", candidate_version=None,
            image_jpeg=JPEG,
        ))

    def saved_then_cut_off(route: Route) -> None:
        route.fetch()  # the request reaches the station, which saves the verdict
        route.abort("connectionreset")  # and its answer never reaches the screen

    problems: list[str] = []
    try:
        with station_ui_server(store, b"audit-screen-key" * 2) as base, \
                sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = watched_page(browser, problems)
                sign_in(page, base, BADGE, PIN)
                page.wait_for_selector("#current[data-part-id='P-1']")
                page.route("**/verdict", saved_then_cut_off)
                page.evaluate(RECORD_TOASTS)
                page.click(REJECT)
                page.wait_for_selector("#current[data-part-id='P-2']")
                page.wait_for_selector(f"{TOAST}:has-text('P-1 is judged')")
                toasts = page.evaluate("window.toastsSeen")
            finally:
                browser.close()
    finally:
        verdicts = store.verdicts_since(datetime(2000, 1, 1, tzinfo=UTC))
        store.close()
    # First that it cannot know; once the queue shows the part judged, that it is (not
    # "judged on another screen").
    assert toasts == [
        "Maybe not recorded: the screen lost its connection. Tap again to make sure.",
        "Part P-1 is judged: the station has its verdict",
    ], toasts
    assert [(v.part_id, v.operator, v.outcome) for v in verdicts] == [("P-1", BADGE, "reject")]
    unexpected = [problem for problem in problems if "ERR_CONNECTION_RESET" not in problem]
    assert unexpected == [], f"the browser reported errors: {unexpected}"
