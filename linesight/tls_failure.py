"""What a failed TLS handshake with the broker means, in words a technician can act on.

A line PC's certificates fail in a few ways, and each has its own fix: the broker's certificate
expired (renew it), is not valid yet (this device's clock is behind: a flat RTC battery), was
issued for another host name (use the name it names), or is signed by a CA the station does not
trust (`broker.ca_file`). OpenSSL says so in a verify code; `describe` turns it into a sentence.

The broker checks the station's own certificate (`broker.cert_file`) when it requires one. It
says what it did not like in a TLS alert: during the handshake under TLS 1.2, but under TLS 1.3
only after the client finished it, on the first read, or not at all when it closes the
connection before the client's CONNECT is written. `describe_closed` covers that case.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["describe", "describe_closed", "is_alert"]

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h).
_NOT_YET_VALID = 9
_EXPIRED = 10
# Issuer not found (2, 20), signed by another key than the trusted CA of that name (7),
# self-signed leaf or chain (18, 19), leaf not verifiable (21).
_UNTRUSTED = {2, 7, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}  # host name, IP address

# What the broker's alert says about this device's client certificate, by a word of OpenSSL's
# reason (SSLV3_ALERT_CERTIFICATE_EXPIRED, TLSV13_ALERT_CERTIFICATE_REQUIRED, ...).
_ALERTS = (
    ("CERTIFICATE_EXPIRED", "the broker refuses this device's client certificate{mine}: it has "
     "expired, or the broker's clock is ahead: renew it"),
    ("CERTIFICATE_REVOKED", "the broker refuses this device's client certificate{mine}: it was "
     "revoked: issue a new one"),
    ("UNKNOWN_CA", "the broker does not trust the CA that signed this device's client "
     "certificate{mine}"),
    ("BAD_CERTIFICATE", "the broker refuses this device's client certificate{mine}: check that "
     "it is valid now by the broker's clock and signed by the CA the broker trusts"),
)


def describe(
    error: ssl.SSLError, host: str, port: int, ca_file: Path | None, cert_file: Path | None
) -> str:
    """One message for a TLS handshake with `host:port` that failed with `error`."""
    where = f"TLS with the broker {host}:{port} failed"
    if isinstance(error, ssl.SSLCertVerificationError):
        # Set by OpenSSL on a real handshake; an error built by hand has neither.
        verify_message = getattr(error, "verify_message", None)
        detail = f"certificate verify failed: {verify_message}" if verify_message else str(error)
        code = getattr(error, "verify_code", None)
        if code == _EXPIRED:
            advice = ("its certificate has expired, or this device's clock is ahead: renew the "
                      "broker's certificate, or set the clock")
        elif code == _NOT_YET_VALID:
            advice = ("its certificate is not valid yet: this device's clock is probably behind "
                      "(check the clock and its time source)")
        elif code in _NAME_MISMATCH:
            advice = (f"its certificate is not issued for {host!r}: put the host name it names "
                      "in broker.url")
        elif code in _UNTRUSTED:
            trusted = f"broker.ca_file ({ca_file})" if ca_file else "the system's trust store"
            advice = f"its certificate is not signed by a CA in {trusted}"
        else:
            advice = "its certificate was not accepted"
        return f"{where}: {advice} ({detail})"
    reason = getattr(error, "reason", None) or str(error)
    if "ALERT" in reason.upper():
        return f"{where}: {_alert_advice(reason, cert_file)} ({reason})"
    return f"{where}: {reason} ({error})"


def is_alert(error: OSError | None) -> bool:
    """Whether `error` is a TLS alert the broker sent (it says why it refused)."""
    return "ALERT" in (getattr(error, "reason", None) or "").upper()


def describe_closed(error: OSError | None, host: str, port: int, cert_file: Path | None) -> str:
    """One message for a TLS connection to `host:port` that the broker ended after the
    handshake and before it answered CONNECT; `error` is what the socket raised, None when it
    was simply closed."""
    where = f"TLS with the broker {host}:{port} failed"
    if is_alert(error):
        reason = str(getattr(error, "reason", ""))
        return f"{where}: {_alert_advice(reason, cert_file)} ({reason})"
    mine = (f"this device's ({cert_file})" if cert_file
            else "none is configured here: set broker.cert_file and broker.key_file")
    seen = f" ({error})" if error is not None else ""
    return (f"{where}: the broker closed the connection right after the handshake, before "
            "answering CONNECT; a broker that requires client certificates does so when it "
            f"refuses one: {mine}{seen}")


def _alert_advice(reason: str, cert_file: Path | None) -> str:
    upper = reason.upper()
    mine = f" ({cert_file})" if cert_file else ""
    if "CERTIFICATE_REQUIRED" in upper:
        if cert_file is None:
            return ("the broker requires a client certificate: set broker.cert_file and "
                    "broker.key_file")
        return f"the broker requires a client certificate and took none from {cert_file}"
    for word, advice in _ALERTS:
        if word in upper:
            return advice.format(mine=mine)
    return (f"the broker ended the handshake; check this device's client certificate{mine} "
            "and the broker's TLS settings")
