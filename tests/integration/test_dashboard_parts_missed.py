"""Parts a station did not inspect (StationMetrics.parts_missed), in the fleet inventory: a real
controller and a real mosquitto; the stations' state and metrics are published as agents publish
them. The API's /api/stations, `linesight fleet stations` and the dashboard in headless Chromium
show the parts missed in the last hour, marked when there are any, and say so when a station
does not report them (a synthetic source, an older agent, no metrics yet)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.client import ControllerClient
from deploy.controller import Controller
from linesight import protocol as p
from linesight.broker import start_broker
from linesight.cli import main
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    SCREENSHOTS,
    launch_chromium,
    served_controller,
    wait_for,
    watched_page,
)

pytestmark = pytest.mark.timeout(60)

# (minutes ago, parts missed in that 10 s window) per station; None: the field is absent. The
# newest is stamped now: the controller would take an older one for a clock behind.
REPORTS: dict[str, list[tuple[float, int | None]]] = {
    # 50 missed two hours ago are out of the hour; 4 + 3 are in it.
    "st-lossy": [(120, 50), (30, 4), (20, 0), (0, 3)],
    "st-clean": [(40, 0), (0, 0)],
    # A synthetic source cannot miss a part: its reports carry no parts_missed.
    "st-synthetic": [(30, None), (0, None)],
    # It missed parts, but only more than an hour ago: nothing recent.
    "st-earlier": [(90, 12), (0, 0)],
}
NO_METRICS = "st-new"  # online, no metrics report yet


def _publish(broker_url: str) -> None:
    topics = p.Topics(p.DEFAULT_PREFIX)
    now = datetime.now(UTC)
    link = MqttLink(LinkConfig(url=broker_url, client_id="parts-missed-test"))
    link.start()
    try:
        assert link.wait_connected(10), "could not reach the broker"
        for station in [*REPORTS, NO_METRICS]:
            state = p.StationState(station=station, seq=1, online=True)
            link.publish(topics.station(station, p.Channel.STATE), state.to_json(), qos=1,
                         retain=True).wait(10)
        for station, reports in REPORTS.items():
            for index, (minutes_ago, missed) in enumerate(reports):
                metrics = p.StationMetrics(
                    station=station, seq=index, ts=now - timedelta(minutes=minutes_ago),
                    window_s=10.0, parts=50, parts_missed=missed,
                )
                link.publish(topics.station(station, p.Channel.METRICS), metrics.to_json(),
                             qos=1).wait(10)
    finally:
        link.stop()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Controller, ControllerClient]]:
    root: Path = tmp_path_factory.mktemp("parts-missed")
    broker = start_broker(root / "broker")
    try:
        with served_controller(root, broker.url) as (ctl, client):
            _publish(broker.url)
            expected = sum(len(reports) for reports in REPORTS.values())
            wait_for(lambda: ctl.counters.stored >= expected
                     and len(client.stations()) == len(REPORTS) + 1, 20,
                     "every state and metrics report stored")
            yield ctl, client
    finally:
        broker.stop()


def test_the_api_gives_each_station_its_parts_missed_in_the_last_hour(
    served: tuple[Controller, ControllerClient],
) -> None:
    _, client = served
    missed = {s["station"]: s["parts_missed_last_hour"] for s in client.stations()}
    assert {name: value and value["parts"] for name, value in missed.items()} == {
        "st-lossy": 7, "st-clean": 0, "st-synthetic": None, "st-earlier": 0, NO_METRICS: None,
    }
    lossy = missed["st-lossy"]
    assert lossy is not None
    latest = datetime.fromisoformat(lossy["last_missed"])
    assert timedelta(0) < datetime.now(UTC) - latest < timedelta(minutes=2)
    assert missed["st-clean"] == {"parts": 0, "last_missed": None}
    assert missed["st-earlier"] == {"parts": 0, "last_missed": None}


def test_fleet_stations_names_a_station_missing_parts(
    served: tuple[Controller, ControllerClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = served
    assert main(["fleet", "stations", "--controller", client.url]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "MISSED 7 PARTS in the last hour" in lines["st-lossy"]
    assert "missed/h 0 " in lines["st-clean"] and "MISSED" not in lines["st-clean"]
    assert "missed/h - " in lines["st-synthetic"]
    assert "missed/h - " in lines[NO_METRICS]


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)
def test_the_dashboard_marks_a_station_missing_parts(
    served: tuple[Controller, ControllerClient],
) -> None:
    from playwright.sync_api import sync_playwright

    _, client = served
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems)
            page.goto(client.url + "/")
            page.locator("#stations tr[data-station='st-lossy'] .missed").wait_for()
            cells = {
                name: page.locator(f"#stations tr[data-station='{name}'] td.parts-cell")
                for name in [*REPORTS, NO_METRICS]
            }
            notes = {name: cell.locator(".missed").inner_text() for name, cell in cells.items()}
            assert notes == {"st-lossy": "missed 7", "st-clean": "missed 0",
                             "st-synthetic": "missed: not reported", "st-earlier": "missed 0",
                             NO_METRICS: "missed: not reported"}
            marked = {name for name, cell in cells.items()
                      if "missing-parts" in (cell.get_attribute("class") or "")}
            assert marked == {"st-lossy"}
            assert cells["st-lossy"].locator(".missed-last").inner_text().startswith("last ")
            header = page.locator("#stations-head th.parts-head").inner_text()
            assert "last hour" in header.lower()
            page.screenshot(path=str(SCREENSHOTS / "dashboard-parts-missed.png"), full_page=True)
            widths = page.evaluate("() => { const p = document.querySelector('.panel.stations');"
                                   " return [p.scrollWidth, p.clientWidth]; }")
            assert widths[0] <= widths[1] + 1, f"the stations table is cut off: {widths}"
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
