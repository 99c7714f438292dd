"""End to end in headless Chromium: a real agent flags parts, an operator rejects one on the
screen, and the Verdict reaches the broker carrying the operator's badge."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.store import ReviewItem, StationStore
from linesight import protocol as p
from linesight.broker import Broker
from station_ui.security import hash_pin
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    SCREENSHOTS,
    V1,
    Collector,
    Receipter,
    launch_chromium,
    station_config,
    station_ui_server,
    wait_for,
    watched_page,
)

BADGE = "op-17"
PIN = "2580"
_NONE = SimpleNamespace(outcome=None)  # a part not (yet) in the store

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.skipif(not (V1 / "manifest.json").exists(),
                       reason=f"needs the shipped model bundle {V1}"),
    pytest.mark.timeout(120),
]


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[tuple[str, StationStore]]:
    """The station UI on a free port, on the store the agent will write to."""
    store = StationStore(tmp_path / "station")
    store.upsert_operator(BADGE, "Robin Line", "supervisor", hash_pin(PIN))
    try:
        with station_ui_server(store, b"browser-test-key" * 2) as base:
            yield base, store
    finally:
        store.close()


def test_operator_rejects_a_flagged_part_in_the_browser(
    tmp_path: Path, broker: Broker, ui_server: tuple[str, StationStore]
) -> None:
    from playwright.sync_api import sync_playwright

    base, store = ui_server
    receipter = Receipter(broker.url)
    collector = Collector(broker.url)
    agent = Agent(station_config(
        store.data_dir, broker.url, automation="assist", source="synthetic:seed=4,rate=5"
    ))
    agent_thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    agent_thread.start()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    try:
        wait_for(lambda: store.review_count() >= 2, 30, "the agent to flag parts")
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = watched_page(browser, problems)

                page.goto(f"{base}/")
                page.fill("#badge", BADGE)
                page.click("#pin")
                for digit in PIN:  # the on-screen keypad, as a gloved operator would
                    page.click(f"[data-keypad] button[data-digit='{digit}']")
                page.click(".keypad-go")
                page.wait_for_selector("#current .part-id")
                part_id = page.inner_text("#current .part-id")
                assert page.inner_text("#queue-count").strip().isdigit()
                assert "Model suggests" in page.inner_text("#current")
                page.wait_for_function(
                    "() => !document.querySelector('.banner[data-kind=agent_down]')"
                )
                page.screenshot(path=str(SCREENSHOTS / "review-1280x800.png"))

                page.click("#current [data-zoom]")
                page.wait_for_selector("#zoom:not([hidden])")
                page.screenshot(path=str(SCREENSHOTS / "zoom-1280x800.png"))
                page.click("[data-zoom-close]")

                page.click("#current button[value=reject]")
                page.wait_for_selector("#toast:not([hidden])")
                assert "rejected" in page.inner_text("#toast")
                wait_for(
                    lambda: any(v.part_id == part_id for v in collector.of(p.Verdict)),
                    20, "the verdict to reach the broker",
                )
                verdict = next(v for v in collector.of(p.Verdict) if v.part_id == part_id)
                assert verdict.operator == BADGE
                assert verdict.outcome == p.VerdictOutcome.REJECT
                assert verdict.label == "defect"

                # The next part slides in without a reload; P passes it from the keyboard.
                page.wait_for_function(
                    "(judged) => { const c = document.getElementById('current');"
                    " return c && c.dataset.partId && c.dataset.partId !== judged; }",
                    arg=part_id,
                )
                second = page.inner_text("#current .part-id")
                # A card that has just come in ignores keys for a moment (a bounced key).
                page.wait_for_selector("#current button[value=pass]:enabled")
                page.keyboard.press("p")
                wait_for(
                    lambda: any(
                        v.part_id == second and v.outcome == p.VerdictOutcome.PASS
                        for v in collector.of(p.Verdict)
                    ),
                    20, "the keyboard verdict to reach the broker",
                )

                # Unsure: E escalates the next part; it waits on the supervisor's page, where
                # the final verdict is given and reaches the broker as the part's label.
                page.wait_for_function(
                    "(judged) => { const c = document.getElementById('current');"
                    " return c && c.dataset.partId && c.dataset.partId !== judged; }",
                    arg=second,
                )
                unsure = page.inner_text("#current .part-id")
                page.wait_for_selector("#current button[value=escalate]:enabled")
                page.keyboard.press("e")
                wait_for(lambda: store.escalation_count() == 1, 20, "the escalation stored")
                page.goto(f"{base}/supervisor")
                row = page.locator(f".escalation[data-part-id='{unsure}']")
                assert "escalated by " + BADGE in row.inner_text()
                page.screenshot(path=str(SCREENSHOTS / "supervisor-1280x800.png"))
                row.locator("button[value=reject]").click()
                page.wait_for_selector(".flash-ok")
                assert "final verdict recorded" in page.inner_text(".flash-ok")
                wait_for(
                    lambda: [
                        (v.outcome, v.label) for v in collector.unique(p.Verdict)
                        if v.part_id == unsure
                    ] == [(p.VerdictOutcome.ESCALATE, None), (p.VerdictOutcome.REJECT, "defect")],
                    20, "the escalation and the supervisor's verdict to reach the broker",
                )

                # The part passed from the keyboard was a mistake: the supervisor corrects it,
                # and the correction reaches the broker as the part's latest labelled verdict.
                row = page.locator(f".correction[data-part-id='{second}']")
                assert "passed by " + BADGE in row.inner_text()
                row.locator("button[value=reject]").click()
                page.wait_for_selector(".flash-ok")
                assert "corrected to rejected" in page.inner_text(".flash-ok")
                assert page.locator(f".correction[data-part-id='{second}']").count() == 0
                wait_for(
                    lambda: [
                        (v.outcome, v.label) for v in collector.unique(p.Verdict)
                        if v.part_id == second
                    ] == [(p.VerdictOutcome.PASS, "ok"), (p.VerdictOutcome.REJECT, "defect")],
                    20, "the operator's pass and the supervisor's correction to reach the broker",
                )

                page.goto(f"{base}/status")
                page.wait_for_selector("svg.plot")
                assert "part-classifier 1.0.0" in page.inner_text("main")
                page.screenshot(path=str(SCREENSHOTS / "status-1280x800.png"))


                page.set_viewport_size({"width": 800, "height": 480})
                page.goto(f"{base}/")
                page.wait_for_selector("#current .part-id")
                reject_box = page.locator("#current button[value=reject]").bounding_box()
                assert reject_box is not None and reject_box["height"] >= 80
                assert reject_box["y"] + reject_box["height"] <= 480, "Reject is below the fold"
                page.screenshot(path=str(SCREENSHOTS / "review-800x480.png"))

                page.context.clear_cookies()
                page.goto(f"{base}/login")
                page.screenshot(path=str(SCREENSHOTS / "login-800x480.png"))
            finally:
                browser.close()
    finally:
        agent.stop()
        agent_thread.join(timeout=30)
        collector.close()
        receipter.close()
    assert not agent_thread.is_alive(), "the agent did not stop"
    assert problems == [], f"the browser reported errors: {problems}"


def _queue_part(store: StationStore, part_id: str, *, age_s: float) -> None:
    image = np.full((96, 96, 3), 128, np.uint8)
    store.add_review(ReviewItem(
        part_id=part_id, created=datetime.now(UTC) - timedelta(seconds=age_s),
        reason="disagreement", automation="assist", suggestion=None, confidence=None,
        model_label="ok", candidate_label="defect", active_version="1.0.0",
        candidate_version="2.0.0", image_jpeg=cv2.imencode(".jpg", image)[1].tobytes(),
    ))


def _sign_in(page: Any, base: str) -> None:
    page.goto(f"{base}/")
    page.fill("#badge", BADGE)
    page.fill("#pin", PIN)
    page.click(".keypad-go")


def _shown(page: Any) -> str:
    return str(page.get_attribute("#current", "data-part-id") or "")


def test_the_card_on_screen_stays_until_its_part_is_judged(
    ui_server: tuple[str, StationStore],
) -> None:
    """A disagreement found after the part on screen, but captured before it, becomes the head
    of the queue: it must wait its turn, not replace the card (or the open enlargement) under
    the operator's finger, where the next key press would judge a part nobody looked at."""
    from playwright.sync_api import sync_playwright

    base, store = ui_server
    _queue_part(store, "A-100", age_s=0)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems)
            _sign_in(page, base)
            page.wait_for_selector("#current .part-id")
            assert _shown(page) == "A-100"
            page.click("#current [data-zoom]")
            page.wait_for_selector("#zoom:not([hidden])")

            _queue_part(store, "D-099", age_s=5)  # now the head of the queue
            page.wait_for_function(
                "() => [...document.querySelectorAll('#upcoming .up-id')]"
                ".some((e) => e.textContent === 'D-099')"
            )
            page.wait_for_timeout(1200)  # two more polls
            assert _shown(page) == "A-100"
            assert page.is_visible("#zoom")
            assert "A-100" in (page.get_attribute("[data-zoom-image]", "src") or "")

            page.keyboard.press("r")  # the enlarged image is open: no verdict
            page.keyboard.press("Escape")
            page.wait_for_selector("#zoom", state="hidden")
            page.click("#current button[value=pass]")
            wait_for(lambda: (store.review("A-100") or _NONE).outcome is not None, 10,
                     "the verdict for the part on screen")
            assert (store.review("A-100") or _NONE).outcome == "pass"
            page.wait_for_function("() => document.getElementById('current')"
                                   ".dataset.partId === 'D-099'")
            assert (store.review("D-099") or _NONE).outcome is None

            # Judged on another screen: this one says so and moves on.
            store.record_verdict("D-099", "op-99", "reject", "defect", datetime.now(UTC))
            page.wait_for_function("() => !document.getElementById('toast').hidden && document"
                                   ".getElementById('toast').textContent.includes('D-099')")
            assert "judged on another screen" in page.inner_text("#toast")
            page.wait_for_selector("#current .empty")
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"


def test_a_barcode_scanner_typing_on_the_screen_judges_nothing(
    ui_server: tuple[str, StationStore],
) -> None:
    """A keyboard-wedge scanner types a whole code as keystrokes a few ms apart: the P and R in
    "PR4471" must not judge the part on screen. A P pressed on its own still passes it."""
    from playwright.sync_api import sync_playwright

    base, store = ui_server
    _queue_part(store, "S-1", age_s=0)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems)
            _sign_in(page, base)
            page.wait_for_selector("#current button[value=pass]:enabled")
            assert _shown(page) == "S-1"

            # The burst is dispatched within one task of the page, keys microseconds apart as
            # from a fast scanner: a test machine's scheduler cannot spread it out.
            for code in ("pr4471", "PR4471\n"):
                page.evaluate(
                    """(code) => { for (const ch of code) {
                        const key = ch === "\\n" ? "Enter" : ch;
                        document.body.dispatchEvent(
                            new KeyboardEvent("keydown", {key, bubbles: true}));
                    } }""",
                    code,
                )
                page.wait_for_timeout(400)  # time for a wrongly sent verdict to be stored
                assert (store.review("S-1") or _NONE).outcome is None, f"{code!r} judged the part"
            assert _shown(page) == "S-1"
            assert page.is_hidden("#toast")

            page.keyboard.press("p")
            wait_for(lambda: (store.review("S-1") or _NONE).outcome is not None, 10,
                     "the verdict of a single key press")
            assert (store.review("S-1") or _NONE).outcome == "pass"
            page.wait_for_selector("#current .empty")
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
