"""Warnings before a TLS certificate expires: when they start, what they say, and the link's
own certificate read from its file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from linesight.cert_expiry import not_after_of, warning
from linesight.mqtt import LinkConfig, MqttLink
from tests.integration.test_mqtt_tls import make_ca_and_server

pytestmark = pytest.mark.unit

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("left", "said"),
    [
        (timedelta(days=29, hours=23), "expires on 2027-03-31 11:00 UTC, in 30 days: renew it"),
        (timedelta(days=3), "expires on 2027-03-04 12:00 UTC, in 3 days: renew it before then"),
        (timedelta(hours=30), "in 30 hours: renew it before then"),
        (timedelta(0), "expired on 2027-03-01 12:00 UTC: renew it"),
        (timedelta(days=-2), "expired on 2027-02-27 12:00 UTC: renew it"),
    ],
)
def test_within_the_warning_days_it_says_when(left: timedelta, said: str) -> None:
    text = warning("the broker's certificate (h:8883)", NOW + left, NOW, 30)
    assert text is not None and text.startswith("the broker's certificate (h:8883) ")
    assert said in text


def test_no_warning_before_the_warning_days_or_when_turned_off() -> None:
    assert warning("x", NOW + timedelta(days=30, seconds=1), NOW, 30) is None
    assert warning("x", NOW + timedelta(days=1), NOW, 0) is None
    assert warning("x", NOW - timedelta(days=1), NOW, 0) is None


def test_the_expiry_is_read_from_a_pem_file_and_garbage_is_an_error(tmp_path: Path) -> None:
    files = make_ca_and_server(tmp_path, valid_until=timedelta(days=5))
    expires = not_after_of(files.cert_file)
    assert timedelta(days=4, hours=23) < expires - datetime.now(UTC) <= timedelta(days=5)
    with pytest.raises(ValueError, match="key.pem: no readable certificate"):
        not_after_of(files.key_file.rename(tmp_path / "key.pem"))


def test_a_link_warns_of_its_own_client_certificate(tmp_path: Path) -> None:
    soon = make_ca_and_server(tmp_path, valid_until=timedelta(days=10))
    config = LinkConfig(url="mqtts://broker:8883", client_id="station-01",
                        ca_file=soon.ca_file, cert_file=soon.cert_file, key_file=soon.key_file)
    link = MqttLink(config)
    try:
        warned = link.cert_warning
        assert warned is not None
        assert warned.startswith(f"this client's certificate ({soon.cert_file}) expires on ")
        assert "in 10 days" in warned
        assert MqttLink(config.model_copy(update={"cert_warn_days": 5})).cert_warning is None
    finally:
        link.stop()


def test_a_cert_file_whose_expiry_cannot_be_read_costs_only_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_ca_and_server(tmp_path, valid_until=timedelta(days=3))
    config = LinkConfig(url="mqtts://broker:8883", client_id="station-01",
                        ca_file=files.ca_file, cert_file=files.cert_file, key_file=files.key_file)

    def unreadable(path: Path) -> datetime:
        raise ValueError(f"{path}: no readable certificate: (a form only OpenSSL reads)")

    monkeypatch.setattr("linesight.cert_expiry.not_after_of", unreadable)
    link = MqttLink(config)
    try:
        assert link.cert_warning is None
    finally:
        link.stop()
