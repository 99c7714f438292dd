"""What a failed TLS handshake with the broker means, in words a technician can act on.

A line PC's certificates fail in a few ways, and each has its own fix: the broker's certificate
expired (renew it), is not valid yet (this device's clock is behind: a flat RTC battery), was
issued for another host name (use the name it names), or is signed by a CA the station does not
trust (`broker.ca_file`). OpenSSL says so in a verify code; `describe` turns it into a sentence.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["describe"]

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h).
_NOT_YET_VALID = 9
_EXPIRED = 10
# Issuer not found (2, 20), signed by another key than the trusted CA of that name (7),
# self-signed leaf or chain (18, 19), leaf not verifiable (21).
_UNTRUSTED = {2, 7, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}  # host name, IP address


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
        mine = f" ({cert_file})" if cert_file else ""
        return (f"{where}: the broker ended the handshake ({reason}); check this station's "
                f"client certificate{mine} and the broker's TLS settings")
    return f"{where}: {reason} ({error})"
