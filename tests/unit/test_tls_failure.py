"""The words for a failed TLS handshake with the broker: each failure names its fix."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from linesight.tls_failure import describe, describe_closed, is_alert

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


def alert(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


MINE = Path("/etc/linesight/station.pem")


@pytest.mark.parametrize(("reason", "said"), [
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", f"the broker refuses this device's client certificate "
     f"({MINE}): it has expired, or the broker's clock is ahead: renew it"),
    ("SSLV3_ALERT_CERTIFICATE_REVOKED", f"the broker refuses this device's client certificate "
     f"({MINE}): it was revoked: issue a new one"),
    ("TLSV1_ALERT_UNKNOWN_CA", f"the broker does not trust the CA that signed this device's "
     f"client certificate ({MINE})"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", f"the broker refuses this device's client certificate "
     f"({MINE}): check that it is valid now by the broker's clock and signed by the CA the "
     "broker trusts"),
    ("TLSV13_ALERT_CERTIFICATE_REQUIRED", f"the broker requires a client certificate and took "
     f"none from {MINE}"),
    ("SSLV3_ALERT_HANDSHAKE_FAILURE", f"the broker ended the handshake; check this device's "
     f"client certificate ({MINE}) and the broker's TLS settings"),
])
def test_an_alert_from_the_broker_points_at_the_station_s_own_certificate(
    reason: str, said: str
) -> None:
    for text in (describe(alert(reason), "h", 8883, CA, MINE),  # in the handshake (TLS 1.2)
                 describe_closed(alert(reason), "h", 8883, MINE)):  # after it (TLS 1.3)
        assert text == f"TLS with the broker h:8883 failed: {said} ({reason})"
    assert is_alert(alert(reason))


def test_without_a_client_certificate_the_keys_to_set_are_named() -> None:
    required = describe_closed(alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "h", 8883, None)
    assert required.endswith("the broker requires a client certificate: set broker.cert_file "
                             "and broker.key_file (TLSV13_ALERT_CERTIFICATE_REQUIRED)")
    closed = describe_closed(None, "h", 8883, None)
    assert "closed the connection right after the handshake" in closed
    assert closed.endswith("none is configured here: set broker.cert_file and broker.key_file")


def test_a_connection_closed_without_an_alert_names_the_certificate_it_may_be() -> None:
    error = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    text = describe_closed(error, "h", 8883, MINE)
    assert text == (
        "TLS with the broker h:8883 failed: the broker closed the connection right after the "
        "handshake, before answering CONNECT; a broker that requires client certificates does "
        f"so when it refuses one: this device's ({MINE}) ({error})"
    )
    assert not is_alert(error) and not is_alert(None)
    assert not is_alert(ConnectionResetError(104, "Connection reset by peer"))


def test_any_other_tls_error_is_passed_on_as_it_is() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    text = describe(error, "h", 1883, None, None)
    assert text.startswith("TLS with the broker h:1883 failed: WRONG_VERSION_NUMBER")
