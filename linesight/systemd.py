"""Talking to systemd from a service: readiness, watchdog pings and status (sd_notify).

Pure standard library. Outside systemd (no ``NOTIFY_SOCKET``: a terminal, a container, a test)
every call is a no-op that returns False, so callers never need to ask where they run.
A unit with ``Type=notify`` is started once `notify("READY=1")` arrives; with ``WatchdogSec=``
systemd restarts the service when ``WATCHDOG=1`` stops coming.
"""

from __future__ import annotations

import os
import socket

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


def status(text: str) -> str:
    """A ``STATUS=`` line for `notify`: what ``systemctl status`` shows (one line)."""
    return "STATUS=" + " ".join(text.split())


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used on a station


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, a `status`; several
    lines joined by newlines) to systemd. True when it was sent, False outside systemd or when
    the socket is gone: a notification is never worth failing the caller for."""
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1`` (``WatchdogSec=``), or None when no
    watchdog applies to this process. Ping at least every half of it."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (the variable was inherited)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
