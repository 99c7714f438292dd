"""Why a link cannot connect is in the log at WARNING, once per distinct reason, not only at
DEBUG: a station whose broker is down, or whose TLS settings do not fit the broker, says so."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from linesight.broker import free_port, start_broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.integration.test_mqtt_tls import _fresh, make_ca_and_server


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "linesight.mqtt" and r.levelno >= logging.WARNING]


def _attempts(link: MqttLink, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while link.connect_attempts < count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # the last attempt's failure is logged after it counted
    assert link.connect_attempts >= count


def test_an_unreachable_broker_is_a_warning_once_and_its_return_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="linesight.mqtt")
    port = free_port()
    link = MqttLink(LinkConfig(url=f"mqtt://127.0.0.1:{port}", client_id="station-s1",
                               backoff_min_s=0.05, backoff_max_s=0.1))
    link.start()
    try:
        _attempts(link, 4)
        warnings = _warnings(caplog)
        assert len(warnings) == 1, warnings
        assert f"127.0.0.1:{port}" in warnings[0] and "refused" in warnings[0].lower()
        with start_broker(tmp_path / "broker", port=port):
            assert link.wait_connected(10)
            link.stop()
        assert any("connected to" in r.getMessage() and r.levelno == logging.INFO
                   for r in caplog.records)
    finally:
        link.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_server_certificate_from_an_unknown_ca_is_a_warning_naming_the_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="linesight.mqtt")
    tls = make_ca_and_server(tmp_path)
    stranger = make_ca_and_server(_fresh(tmp_path / "other"))
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        link = MqttLink(LinkConfig(url=broker.url, client_id="tls-stranger",
                                   ca_file=stranger.ca_file, backoff_min_s=0.05,
                                   backoff_max_s=0.1))
        link.start()
        try:
            _attempts(link, 3)
            assert not link.connected
        finally:
            link.stop()
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "certificate verify failed" in warnings[0], warnings
    assert "not signed by a CA in broker.ca_file" in warnings[0], warnings
