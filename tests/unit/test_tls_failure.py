"""The words for a failed TLS handshake with the broker: each failure names its fix."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from linesight.tls_failure import describe

pytestmark = pytest.mark.unit

CA = Path("/etc/linesight/ca.pem")


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("code", "message", "said"),
    [
        (10, "certificate has expired", "has expired, or this device's clock is ahead"),
        (9, "certificate is not yet valid", "this device's clock is probably behind"),
        (62, "Hostname mismatch", "not issued for 'line-server': put the host name"),
        (64, "IP address mismatch", "not issued for 'line-server'"),
        (20, "unable to get local issuer certificate",
         f"not signed by a CA in broker.ca_file ({CA})"),
        (7, "certificate signature failure", "not signed by a CA in broker.ca_file"),
        (26, "unsupported certificate purpose", "its certificate was not accepted"),
    ],
)
def test_a_verification_failure_names_its_cause_and_the_broker(
    code: int, message: str, said: str
) -> None:
    text = describe(verify_error(code, message), "line-server", 8883, CA, None)
    assert text.startswith("TLS with the broker line-server:8883 failed: ")
    assert said in text
    assert f"(certificate verify failed: {message})" in text


def test_without_a_ca_file_the_system_trust_store_is_named() -> None:
    text = describe(verify_error(20, "unable to get local issuer certificate"), "h", 1, None, None)
    assert "not signed by a CA in the system's trust store" in text


def test_an_alert_from_the_broker_points_at_the_station_s_own_certificate() -> None:
    error = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert cert expired")
    error.reason = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    text = describe(error, "h", 8883, CA, Path("/etc/linesight/station.pem"))
    assert "the broker ended the handshake (SSLV3_ALERT_CERTIFICATE_EXPIRED)" in text
    assert "client certificate (/etc/linesight/station.pem)" in text


def test_any_other_tls_error_is_passed_on_as_it_is() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    text = describe(error, "h", 1883, None, None)
    assert text.startswith("TLS with the broker h:1883 failed: WRONG_VERSION_NUMBER")
