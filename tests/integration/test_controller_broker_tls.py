"""The controller's link to a broker whose certificate it cannot accept: /api/health and the
dashboard (headless Chromium) say why and what to fix, until a renewed certificate lets it in."""

from __future__ import annotations

import gc
import json
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from linesight.broker import free_port, start_broker
from tests.integration.test_mqtt_tls import _fresh, issue_server, make_ca_and_server
from tests.support import (
    HAVE_CHROMIUM,
    NO_CHROMIUM,
    launch_chromium,
    served_controller,
    wait_for,
    watched_page,
)

pytestmark = pytest.mark.timeout(90)


def _health(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "/api/health", timeout=10) as response:  # noqa: S310
        health: dict[str, object] = json.loads(response.read())
        return health


# paho-mqtt leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)
def test_an_expired_broker_certificate_is_named_until_it_is_renewed(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    expired = make_ca_and_server(
        _fresh(tmp_path / "tls"), valid_from=timedelta(days=-30), valid_until=timedelta(days=-1)
    )
    port = free_port()
    problems: list[str] = []
    with served_controller(
        tmp_path, f"mqtts://127.0.0.1:{port}", **{
            "broker.ca_file": expired.ca_file, "broker.backoff_max_s": 1.0,
        }
    ) as (_, client), sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            with start_broker(tmp_path / "broker", port=port, tls=expired):
                wait_for(lambda: _health(client.url)["broker_error"] is not None, 30,
                         "the TLS failure in /api/health")
                health = _health(client.url)
                assert health["broker_connected"] is False
                error = str(health["broker_error"])
                assert f"TLS with the broker 127.0.0.1:{port} failed" in error, error
                assert "its certificate has expired" in error, error

                page = watched_page(browser, problems)
                page.goto(client.url + "/")
                page.wait_for_function("() => document.body.dataset.refreshed")
                banner = page.locator("#broker-banner")
                assert banner.is_visible()
                assert banner.inner_text().strip() == f"Controller and broker: {error}"
                assert page.locator("#broker").inner_text() == "broker DISCONNECTED"

            renewed = issue_server(
                _fresh(tmp_path / "renewed"), expired.ca_file, valid_until=timedelta(days=365)
            )
            with start_broker(tmp_path / "broker-renewed", port=port, tls=renewed):
                wait_for(lambda: _health(client.url)["broker_connected"] is True, 30,
                         "the controller connected")
                assert _health(client.url)["broker_error"] is None
                assert _health(client.url)["broker_cert_warning"] is None
                page.wait_for_function("() => document.getElementById('broker-banner').hidden")
                assert page.locator("#broker").inner_text() == "broker connected"
        finally:
            browser.close()
            gc.collect()  # collect paho's leaked sockets here, under this test's filter
    assert problems == [], f"the browser reported errors: {problems}"


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=NO_CHROMIUM)
def test_a_broker_certificate_that_expires_soon_is_a_warning_while_connected(
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    soon = make_ca_and_server(_fresh(tmp_path / "tls"), valid_until=timedelta(days=5))
    problems: list[str] = []
    with start_broker(tmp_path / "broker", tls=soon) as broker, served_controller(
        tmp_path, broker.url, **{"broker.ca_file": soon.ca_file}
    ) as (_, client), sync_playwright() as playwright:
        wait_for(lambda: _health(client.url)["broker_connected"] is True, 30, "connected")
        health = _health(client.url)
        assert health["broker_error"] is None
        warning = str(health["broker_cert_warning"])
        assert warning.startswith(f"the broker's certificate (127.0.0.1:{broker.port}) expires")
        assert warning.endswith("in 5 days: renew it before then"), warning
        browser = launch_chromium(playwright)
        try:
            page = watched_page(browser, problems)
            page.goto(client.url + "/")
            page.wait_for_function("() => document.body.dataset.refreshed")
            assert page.locator("#broker-banner").inner_text().strip() == (
                f"Controller and broker: {warning}"
            )
            assert page.locator("#broker").inner_text() == "broker connected"
        finally:
            browser.close()
    assert problems == [], f"the browser reported errors: {problems}"
