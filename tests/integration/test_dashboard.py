"""The fleet dashboard in headless Chromium, over a real controller, a real mosquitto and two real
agents: stations and the rollout appear and update, hostile text stays text, Pause and Resume
work from the page, and the page raises no console error (a CSP violation would)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.client import ControllerClient
from deploy.config import load_controller_config
from deploy.controller import Controller
from deploy.rollout import Phase
from linesight import protocol as p
from linesight.broker import Broker, free_port
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import (
    HAVE_CHROMIUM,
    MODELS,
    NO_CHROMIUM,
    SCREENSHOTS,
    V2,
    AgentLine,
    launch_chromium,
    served_controller,
    wait_for,
    watched_page,
)

STATIONS = ("st-1", "st-2")
HOSTILE_LABEL = "<img src=x onerror=window.__pwned=1>"
HOSTILE_FAULT = "<b>bold</b> & <script>window.__pwned=2</script>"
# The first stage cannot finish inside the test: the rollout stays observing while we look.
PLAN = """
name: dashboard-test
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: shadow on st-1
    stations: [st-1]
    mode: shadow
    exit: {min_parts: 100000, min_labelled_disagreements: 30, max_duration_s: 600}
    gate: {min_labels: 20, delta: 0.02, escape_delta: 0.01}
    on_inconclusive: pause
  - name: promote on both
    stations: [st-1, st-2]
    mode: promote
"""

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM),
    pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                       reason=f"needs the shipped model bundle {V2}"),
    pytest.mark.timeout(150),
]


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[AgentLine]:
    # Labels only for st-1's disagreements, so the gate has something to weigh.
    running = AgentLine(broker.url, tmp_path, STATIONS, rate=10, seed=30, operated=["st-1"])
    yield running
    running.stop()


@pytest.fixture
def served(fleet: AgentLine) -> Iterator[tuple[Controller, ControllerClient]]:
    with served_controller(fleet.root, fleet.broker_url) as running:
        yield running


def _publish_hostile_station(broker_url: str) -> None:
    """A station whose label and fault message are markup; the page must show them as text."""
    topics = p.Topics(p.DEFAULT_PREFIX)
    state = p.StationState(
        station="st-x", seq=1, online=True, labels={"line": HOSTILE_LABEL},
        faults=[p.Fault(code="model_nan", message=HOSTILE_FAULT, since=datetime.now(UTC))],
    )
    link = MqttLink(LinkConfig(url=broker_url, client_id="dashboard-test-hostile"))
    link.start()
    try:
        assert link.wait_connected(10), "could not reach the broker"
        ticket = link.publish(topics.station("st-x", p.Channel.STATE), state.to_json(), qos=1,
                              retain=True)
        ticket.wait(10)
    finally:
        link.stop()


def _phase(ctl: Controller) -> Phase | None:
    return ctl.rollout.phase if ctl.rollout else None


def _number(text: str) -> int:
    digits = "".join(ch for ch in text.split("(")[0] if ch.isdigit())
    return int(digits) if digits else 0


def test_the_dashboard_follows_a_rollout_and_pauses_it(
    fleet: AgentLine, served: tuple[Controller, ControllerClient]
) -> None:
    from playwright.sync_api import sync_playwright

    ctl, client = served
    fleet.start()
    _publish_hostile_station(fleet.broker_url)
    wait_for(lambda: len(ctl.fleet()) == 3 and all(v.online for v in ctl.fleet().values()),
             30, "three stations online")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems, timeout_ms=20_000)
            page.goto(client.url + "/")

            # Stations, with the hostile one's markup shown as text.
            page.wait_for_function(
                "() => document.querySelectorAll('#stations tr[data-station]').length === 3")
            hostile = page.locator("#stations tr[data-station='st-x']")
            assert HOSTILE_LABEL in hostile.inner_text()
            assert "<b>bold</b>" in hostile.inner_text()
            assert page.locator("main img, main b, main script").count() == 0
            assert page.evaluate("() => window.__pwned === undefined")
            assert "no rollout" in page.inner_text("#phase").lower()
            assert page.locator("#token-input").count() == 0

            # A rollout started elsewhere shows up without a reload.
            rollout_id = client.start_rollout(PLAN, "part-classifier", "2.0.0")["rollout_id"]
            page.wait_for_function(
                "() => document.querySelectorAll('#stages tr[data-status]').length === 2"
                " && document.querySelector('#stages tr').textContent.includes('st-1')")
            assert "part-classifier 2.0.0" in page.inner_text("#candidate")
            page.wait_for_function(
                "() => document.querySelector('#stations tr[data-station=\"st-1\"]')"
                ".textContent.includes('2.0.0')")
            page.wait_for_selector("#evidence-rows tr[data-measure=parts]")
            first = _number(page.inner_text("#evidence-rows tr[data-measure=parts] .ev-now"))
            page.wait_for_function(
                "(seen) => { const cell = document.querySelector("
                "'#evidence-rows tr[data-measure=parts] .ev-now span');"
                " return cell && parseInt(cell.textContent, 10) > seen; }", arg=first)
            assert "≥ 100000" in page.inner_text("#evidence-rows tr[data-measure=parts]")
            assert "+2.00 %" in page.inner_text("#evidence-rows tr[data-measure=error]")

            # Pause and resume from the page.
            assert page.inner_text("#phase").strip().lower() == "running"
            page.click("#controls [data-action=pause]")
            page.wait_for_function(
                "() => document.getElementById('phase').dataset.phase === 'paused'")
            assert _phase(ctl) == Phase.PAUSED
            assert page.is_enabled("#controls [data-action=resume]")
            assert not page.is_enabled("#controls [data-action=pause]")
            page.click("#controls [data-action=resume]")
            page.wait_for_function(
                "() => document.getElementById('phase').dataset.phase === 'running'")
            assert _phase(ctl) == Phase.RUNNING
            page.wait_for_function(
                "() => document.getElementById('history').textContent"
                ".includes('resumed by dashboard')")

            # The plots fill from /api/series.
            page.wait_for_selector("#plot-decisions rect.bar")
            page.wait_for_selector("#plot-agreement circle.dot")
            page.wait_for_selector("#evidence-rows tr[data-measure=parts]")
            overflowing = page.evaluate(
                "() => [...document.querySelectorAll('.panel')]"
                ".filter((p) => p.scrollWidth > p.clientWidth + 1).map((p) => p.className)")
            assert overflowing == [], f"cut off at 1280 px wide: {overflowing}"
            page.screenshot(path=str(SCREENSHOTS / "dashboard.png"))
            page.screenshot(path=str(SCREENSHOTS / "dashboard-full.png"), full_page=True)

            # One rollout's own page.
            page.goto(f"{client.url}/rollouts/{rollout_id}")
            page.wait_for_function(
                "() => document.querySelectorAll('#stages tr[data-status]').length === 2")
            assert rollout_id in page.inner_text("#past")
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"


def test_the_page_asks_for_the_token_but_never_holds_it(tmp_path: Path) -> None:
    token = "s3cret-token-for-the-dashboard"  # noqa: S105 - a test value
    controller = Controller(load_controller_config(None, {
        "broker.url": f"mqtt://127.0.0.1:{free_port()}", "data_dir": tmp_path / "fleet",
        "bundles": MODELS, "api_token": token,
    }))
    try:
        page = create_app(controller).test_client().get("/")
        html = page.get_data(as_text=True)
        assert page.status_code == 200
        assert 'id="token-input"' in html and token not in html
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    finally:
        controller.stop()
