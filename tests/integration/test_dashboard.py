"""The fleet dashboard in headless Chromium, over a real controller, a real mosquitto and two real
agents: stations and the rollout appear and update, hostile text stays text, Pause and Resume
work from the page, and the page raises no console error (a CSP violation would)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.client import ControllerClient
from deploy.config import load_controller_config
from deploy.controller import Controller
from deploy.fleet_store import SqliteFleetStore
from deploy.plan import parse_plan
from deploy.rollout import CandidateSpec, Phase, start
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, sha256_file
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
    state = p.StationState(
        station="st-x", seq=1, online=True, labels={"line": HOSTILE_LABEL},
        faults=[p.Fault(code="model_nan", message=HOSTILE_FAULT, since=datetime.now(UTC))],
    )
    _publish_state(broker_url, state)


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


def test_a_station_out_of_step_is_shown_and_realigned_from_the_page(
    tmp_path: Path, broker: Broker
) -> None:
    """A rollout promoted 2.0.0 on st-r an hour ago; st-r now reports 1.0.0 active (restored
    from a backup). The row says so, and its button starts the realign rollout."""
    from playwright.sync_api import sync_playwright

    v2 = p.ModelRef(name="part-classifier", version="2.0.0",
                    sha256=sha256_file(V2 / MANIFEST_FILE))
    v1 = p.ModelRef(name="part-classifier", version="1.0.0", sha256="1" * 64)
    plan = parse_plan({"name": "earlier", "promote_without_evidence": True, "stages": [
        {"name": "all", "stations": "all", "mode": "promote"}]})
    earlier = datetime.now(UTC) - timedelta(hours=1)
    promoted = start("r-earlier", plan, CandidateSpec(model=v2, url="http://x/", signature="s"),
                     earlier).model_copy(update={"phase": Phase.PROMOTED,
                                                 "promoted": ["st-r"], "touched": ["st-r"]})
    (tmp_path / "fleet").mkdir()
    with SqliteFleetStore(tmp_path / "fleet" / "fleet.db") as store:
        store.save_rollout(promoted.rollout_id, promoted.phase.value,
                           promoted.model_dump_json(), promoted.updated)
    problems: list[str] = []
    with served_controller(tmp_path, broker.url) as (ctl, client), sync_playwright() as pw:
        _publish_state(broker.url, p.StationState(station="st-r", seq=1, online=True, active=v1))
        wait_for(lambda: [s["out_of_step"] for s in client.stations()] == [True], 20,
                 "st-r out of step")
        browser = launch_chromium(pw)
        try:
            page = watched_page(browser, problems, timeout_ms=20_000)
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(client.url + "/")
            row = page.locator("#stations tr[data-station='st-r']")
            row.locator(".out-of-step").wait_for()
            assert row.locator(".out-of-step").inner_text() == "promoted: part-classifier 2.0.0"
            page.screenshot(path=str(SCREENSHOTS / "dashboard-out-of-step.png"))
            row.locator("button.btn-realign").click()
            page.wait_for_function(
                "() => document.getElementById('action-result').textContent"
                ".includes('puts part-classifier 2.0.0 back')")
            assert ctl.rollout is not None and ctl.rollout.plan.name == "realign st-r"
            assert ctl.rollout.phase == Phase.RUNNING
            page.wait_for_function(
                "() => document.getElementById('plan').textContent.includes('realign st-r')")
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"


def _publish_state(broker_url: str, state: p.StationState) -> None:
    link = MqttLink(LinkConfig(url=broker_url, client_id="dashboard-test-state"))
    link.start()
    try:
        assert link.wait_connected(10), "could not reach the broker"
        topic = p.Topics(p.DEFAULT_PREFIX).station(state.station, p.Channel.STATE)
        link.publish(topic, state.to_json(), qos=1, retain=True).wait(10)
    finally:
        link.stop()


APPROVE_FIRST = """
name: approve first
promote_without_evidence: true
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: promote st-1
    stations: [st-1]
    mode: promote
    approval: true
"""


def test_approve_from_the_page_names_the_stage_it_shows(
    fleet: AgentLine, served: tuple[Controller, ControllerClient]
) -> None:
    """The page's Approve says which stage it approves, so a double click or a retry cannot
    approve a later stage that came to wait meanwhile (the controller refuses a stale one)."""
    from playwright.sync_api import sync_playwright

    ctl, client = served
    fleet.start()
    wait_for(lambda: len(ctl.fleet()) == 2 and all(v.online for v in ctl.fleet().values()),
             30, "two stations online")
    rollout_id = client.start_rollout(APPROVE_FIRST, "part-classifier", "2.0.0")["rollout_id"]
    wait_for(lambda: _phase(ctl) == Phase.WAITING_APPROVAL, 60, "the stage waiting for approval")
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems, timeout_ms=20_000)
            page.goto(client.url + "/")
            page.wait_for_function(
                "() => !document.querySelector('#controls [data-action=approve]').disabled")
            with page.expect_request(f"**/api/rollouts/{rollout_id}/approve") as sent:
                page.click("#controls [data-action=approve]")
            assert sent.value.post_data_json == {"by": "dashboard", "reason": "", "stage": 0}
            page.wait_for_function(
                "() => document.getElementById('phase').dataset.phase === 'promoted'")
        finally:
            browser.close()
    assert _phase(ctl) == Phase.PROMOTED
    assert problems == [], f"the browser reported errors: {problems}"
