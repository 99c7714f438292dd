"""Two clients with one client id (two stations configured with the same name): the broker hands
the session to the newer and disconnects the older with MQTT 5 reason 142, "Session taken over".
The link says so once, names the client id and the broker, and reconnects only every
`takeover_retry_s`, so the two do not flap many times a second; a station raises a fault."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import station_config, wait_for


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.stop()


def _link(made: list[MqttLink], url: str, client_id: str, **fields: Any) -> MqttLink:
    # The fast backoff the other link tests use: without the takeover delay, 10 connects a second.
    values: dict[str, Any] = {
        "url": url, "client_id": client_id, "backoff_min_s": 0.1, "backoff_max_s": 0.5,
    }
    link = MqttLink(LinkConfig.model_validate({**values, **fields}))
    made.append(link)
    return link


def _conflict_errors(caplog: pytest.LogCaptureFixture, client_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "linesight.mqtt" and r.levelno >= logging.ERROR
            and client_id in r.getMessage()]


def test_two_links_with_one_client_id_report_the_conflict_and_stop_flapping(
    broker: Broker, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linesight.mqtt")
    first = _link(links, broker.url, "linesight-agent-press-01")
    second = _link(links, broker.url, "linesight-agent-press-01")
    first.start()
    assert first.wait_connected(10)
    second.start()

    def reported() -> list[str]:
        return [e for e in (first.conflict_error, second.conflict_error) if e is not None]

    wait_for(lambda: bool(reported()), 5, "a conflict error")
    error = reported()[0]
    assert "'linesight-agent-press-01'" in error, error
    assert f"{broker.port}" in error and "same name" in error, error

    attempts = first.connect_attempts + second.connect_attempts
    time.sleep(3)
    # With the default takeover_retry_s (30 s), the link taken over waits: no connect at all in
    # these 3 s; before, the pair made about 20 a second.
    assert first.connect_attempts + second.connect_attempts - attempts <= 2
    assert len(_conflict_errors(caplog, "linesight-agent-press-01")) == 1


def test_the_pair_takes_turns_slowly_and_each_reports_it_once(
    broker: Broker, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linesight.mqtt")
    first = _link(links, broker.url, "twin", takeover_retry_s=0.5)
    second = _link(links, broker.url, "twin", takeover_retry_s=0.5)
    first.start()
    assert first.wait_connected(10)
    second.start()
    started = time.monotonic()
    wait_for(lambda: first.conflict_error is not None and second.conflict_error is not None,
             10, "both links to report the conflict")
    time.sleep(max(0.0, 4 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    # One connect per link per 0.5 s at most (plus the first): ~16 in 4 s, not ~80.
    attempts = first.connect_attempts + second.connect_attempts
    assert attempts <= 2 * (elapsed / 0.5 + 2), attempts
    # Taken over many times, logged once per link.
    assert len(_conflict_errors(caplog, "twin")) == 2, _conflict_errors(caplog, "twin")


class TakingOverBroker:
    """A stand-in for a broker that says "Session taken over" (mosquitto 2.0.15 and later, EMQX,
    HiveMQ; the mosquitto the tests run, Debian's 2.0.11, closes the old connection without a
    word): it accepts every MQTT 5 CONNECT, then at once sends DISCONNECT with reason 142."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._server.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with conn:
                self.connections += 1
                with contextlib.suppress(OSError):
                    self._read_packet(conn)  # CONNECT
                    conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: success, no properties
                    time.sleep(0.05)
                    conn.sendall(b"\xe0\x02\x8e\x00")  # DISCONNECT: Session taken over

    @staticmethod
    def _read_packet(conn: socket.socket) -> bytes:
        conn.recv(1)
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        return body

    def close(self) -> None:
        self._server.close()


def test_a_broker_saying_session_taken_over_is_a_conflict_at_once(
    links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linesight.mqtt")
    broker = TakingOverBroker()
    try:
        link = _link(links, broker.url, "linesight-agent-press-01")
        link.start()
        wait_for(lambda: link.conflict_error is not None, 5, "the conflict error")
        error = link.conflict_error or ""
        assert "reason code 142" in error and "'linesight-agent-press-01'" in error, error
        assert broker.url.removeprefix("mqtt://") in error, error
        time.sleep(2)
        # Taken over on its first connect: the next waits takeover_retry_s (30 s), not 0.1 s.
        assert broker.connections == 1
        assert len(_conflict_errors(caplog, "linesight-agent-press-01")) == 1
    finally:
        broker.close()


def test_the_conflict_clears_once_the_other_client_has_gone(
    broker: Broker, links: list[MqttLink]
) -> None:
    first = _link(links, broker.url, "twin", takeover_retry_s=0.5)
    second = _link(links, broker.url, "twin", takeover_retry_s=0.5)
    first.start()
    assert first.wait_connected(10)
    second.start()
    wait_for(lambda: first.conflict_error is not None, 10, "the first link's conflict")
    second.stop()
    # Back within the retry (0.5 s), and connected twice that long with nobody taking over.
    wait_for(lambda: first.connected and first.conflict_error is None, 10,
             "the conflict to clear")
    assert first.connected


def test_a_restarted_broker_is_no_conflict(broker: Broker, links: list[MqttLink]) -> None:
    link = _link(links, broker.url, "alone")
    link.start()
    assert link.wait_connected(10)
    broker.restart()
    wait_for(lambda: link.connect_attempts >= 2 and link.connected, 20, "the link back")
    assert link.conflict_error is None


def test_a_station_with_a_twin_raises_a_fault_until_the_twin_is_gone(
    tmp_path: Path, broker: Broker, links: list[MqttLink]
) -> None:
    config = station_config(
        tmp_path / "station", broker.url, broker__takeover_retry_s=0.5,
        outbox__relay="thread", outbox__receipt_wait_s=0.2,
    )
    agent = Agent(config)
    finished = threading.Event()

    def run() -> None:
        agent.run()
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        wait_for(lambda: agent.link.connected, 20, "the station connected")
        twin = _link(links, broker.url, config.broker.client_id, takeover_retry_s=0.5)
        twin.start()
        wait_for(lambda: "client_id_conflict" in agent.faults, 10, "the client_id_conflict fault")
        message = agent.faults["client_id_conflict"].message
        assert f"'{config.broker.client_id}'" in message, message
        inspected = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected > inspected + 5, 30, "inspection going on")
        twin.stop()
        wait_for(lambda: "client_id_conflict" not in agent.faults, 15, "the fault to clear")
        assert agent.link.connected
    finally:
        agent.stop()
        assert finished.wait(30)
