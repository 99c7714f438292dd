"""Warnings before a TLS certificate expires, while there is still time to renew it.

A line runs for years; its certificates do not. When the broker's certificate (or a station's
own client certificate) expires, every station loses the broker at once. The MQTT link reads
both expiry dates (the broker's from the handshake, its own from `cert_file`) and `warning`
says, `warn_days` ahead, which one expires when.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

__all__ = ["DEFAULT_WARN_DAYS", "not_after_of", "warning"]

DEFAULT_WARN_DAYS = 30.0


def warning(what: str, expires: datetime, now: datetime, warn_days: float) -> str | None:
    """A sentence when `what` expires within `warn_days` of `now` (or has), else None."""
    left = expires - now
    if warn_days <= 0 or left > timedelta(days=warn_days):
        return None
    when = expires.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if left <= timedelta(0):
        return f"{what} expired on {when}: renew it"
    days = left / timedelta(days=1)
    span = f"{days:.0f} days" if days >= 2 else f"{left / timedelta(hours=1):.0f} hours"
    return f"{what} expires on {when}, in {span}: renew it before then"


def not_after_of(cert_file: Path) -> datetime:
    """The expiry of the first certificate in a PEM file. ValueError when there is none."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cert_file}: no readable certificate: {exc}") from exc
    return certificate.not_valid_after_utc
