"""sd_notify over a real unix datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from linesight import systemd


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def listener(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd does for a Type=notify unit: a datagram socket named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    clean_env.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_outside_systemd_every_call_is_a_harmless_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify(systemd.READY) is False
    assert systemd.notify(systemd.WATCHDOG) is False
    assert systemd.watchdog_interval() is None


def test_ready_watchdog_status_and_stopping_reach_the_socket(listener: socket.socket) -> None:
    assert systemd.notify(systemd.READY)
    assert listener.recv(4096) == b"READY=1"
    assert systemd.notify(systemd.WATCHDOG)
    assert listener.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify(systemd.status("inspecting\n 120 parts,  0 faults"))
    assert listener.recv(4096) == b"STATUS=inspecting 120 parts, 0 faults"
    assert systemd.notify("\n".join([systemd.STOPPING, systemd.status("delivering outbox")]))
    assert listener.recv(4096) == b"STOPPING=1\nSTATUS=delivering outbox"


def test_abstract_namespace_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"linesight-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify(systemd.READY)
        assert sock.recv(4096) == b"READY=1"


def test_a_vanished_socket_is_reported_not_raised(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify(systemd.WATCHDOG) is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify(systemd.WATCHDOG) is False


def test_watchdog_interval_from_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0


def test_watchdog_meant_for_another_process_or_malformed_is_ignored(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    clean_env.delenv("WATCHDOG_PID")
    for value in ("0", "-5", "thirty", ""):
        clean_env.setenv("WATCHDOG_USEC", value)
        assert systemd.watchdog_interval() is None
