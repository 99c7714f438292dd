"""The controller's low-disk warning on the real disk, with a real controller, a real mosquitto and
the real dashboard in headless Chromium: a floor far above the machine's free space shows in
/api/health, /metrics and the dashboard's banner, until the floor is well below the free space
again; a floor of 1 MB shows none of it."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.client import ControllerClient
from deploy.config import MAX_MIN_FREE_MB
from deploy.controller import Controller
from linesight.broker import Broker
from linesight.disk_space import MB, size_text
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    launch_chromium,
    served_controller,
    watched_page,
)

pytestmark = pytest.mark.timeout(90)

HIGH, TINY = MAX_MIN_FREE_MB, 1  # about 954 TB (more than this machine has), and 1 MB


@pytest.fixture(params=[HIGH, TINY], ids=["floor-954TB", "floor-1MB"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, broker: Broker
) -> Iterator[tuple[Controller, ControllerClient, int]]:
    floor: int = request.param
    with served_controller(tmp_path, broker.url, min_free_mb=floor) as (controller, client):
        yield controller, client, floor


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own server
        assert response.status == 200
        text: str = response.read().decode()
        return text


def _gauges(text: str) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("linesight_fleet_disk")}


def test_health_and_metrics_report_the_real_free_space_against_the_floor(
    served: tuple[Controller, ControllerClient, int],
) -> None:
    controller, client, floor = served
    usage = shutil.disk_usage(controller.config.data_dir)
    disk = json.loads(_get(client.url + "/api/health"))["disk"]
    assert disk["min_free_bytes"] == floor * MB
    assert disk["total_bytes"] == usage.total
    assert abs(disk["free_bytes"] - usage.free) < 1024 * MB
    assert disk["low"] is (floor == HIGH)
    assert disk["error"] is None

    gauges = _gauges(_get(client.url + "/metrics"))
    assert gauges["linesight_fleet_disk_free_bytes"] == disk["free_bytes"]
    assert gauges["linesight_fleet_disk_low"] == (1.0 if floor == HIGH else 0.0)


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)
def test_the_dashboard_shows_the_banner_only_below_the_floor(
    served: tuple[Controller, ControllerClient, int],
) -> None:
    from playwright.sync_api import sync_playwright

    controller, client, floor = served
    disk = json.loads(_get(client.url + "/api/health"))["disk"]
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems)
            page.goto(client.url + "/")
            page.wait_for_function("() => document.body.dataset.refreshed")
            banner = page.locator("#disk-banner")
            if floor == HIGH:
                assert banner.is_visible()
                # The free space is measured again every 30 s, and the other tests on this disk
                # write meanwhile: the banner shows one of the two measurements around it.
                after = controller.disk.free_bytes
                assert after is not None
                shown = {size_text(free) for free in (disk["free_bytes"], after)}
                text = banner.inner_text().strip()
                assert any(text == (
                    f"Controller disk: {free} free of {size_text(disk['total_bytes'])}, below "
                    "the 954 TB floor: lower retention_days or add space."
                ) for free in shown), text
                # Free space a little above the floor: still low, until a tenth above it.
                free = controller.disk.free_bytes
                assert free is not None
                # 5 % above the floor: inside the tenth that keeps it low, and far from the
                # floor whatever the other tests on this disk write meanwhile.
                controller.config.min_free_mb = int(free / MB / 1.05)
                assert controller.check_disk().low
                page.wait_for_function("() => document.getElementById('disk-banner')"
                                       ".textContent.includes('only just above the')")
                # Free space well above the floor: the banner goes, without a reload.
                controller.config.min_free_mb = TINY
                assert not controller.check_disk().low
                page.wait_for_function("() => document.getElementById('disk-banner').hidden")
            else:
                assert not banner.is_visible()
                assert "Controller disk" not in page.inner_text("body")
            assert page.locator("#banner").is_hidden(), "the controller answers"
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
