"""The mosquitto we run ourselves: it is ready only when it listens on its own port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from linesight.broker import Broker, BrokerError, start_broker


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    """Another program's listener on a 127.0.0.1 port (SO_REUSEADDR, like most servers)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        yield listener
    finally:
        listener.close()


def test_start_on_a_port_another_program_listens_on_fails_naming_the_port(
    tmp_path: Path, squatter: socket.socket
) -> None:
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    broker = Broker(tmp_path / "broker", port)
    try:
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}: the port is already in use"):
            broker.start()
        assert not broker.running
        assert broker.pid is None
    finally:
        broker.stop()


def test_restart_fails_when_another_program_took_the_port_meanwhile(
    tmp_path: Path, squatter: socket.socket
) -> None:
    # The log already says "running" from the first start: only the new start's lines count.
    broker = start_broker(tmp_path / "broker")
    try:
        port = broker.port
        broker.stop()
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}: the port is already in use"):
            broker.restart()
        assert not broker.running
        squatter.close()
        assert broker.restart().running  # the port is free again: the same broker comes back
        assert broker.port == port
    finally:
        broker.stop()


def test_the_benchmarks_broker_with_the_shipped_tuning_starts(tmp_path: Path) -> None:
    """bench/ runs Mosquitto with deploy/mosquitto.conf's tuning; its start must still see the
    'running' line it waits for."""
    from bench.common import start_shipped_broker

    broker = start_shipped_broker(tmp_path / "shipped")
    try:
        assert broker.running
        assert "connection_messages false" in broker.config_path.read_text()
    finally:
        broker.stop()
    assert not broker.running
