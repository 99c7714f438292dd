"""The MQTT link against a real mosquitto that each test starts and stops itself."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from linesight.broker import Broker, free_port, start_broker, write_password_file
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage, Will
from tests.support import leave_subscribed_session, queued_for_session

WAIT_S = 10.0
PROTOCOLS = ["5", "3.1.1"]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Inbox:
    """Collects what a subscription receives, from paho's network thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []

    def __call__(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]

    def wait_for(self, count: int, timeout: float = WAIT_S) -> list[ReceivedMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout)
        return self.messages


LinkFactory = Callable[..., MqttLink]


@pytest.fixture
def make_link() -> Iterator[LinkFactory]:
    """Builds links with a fast backoff and stops every one of them after the test."""
    links: list[MqttLink] = []

    def build(url: str, client_id: str, *, will: Will | None = None, **fields: Any) -> MqttLink:
        values: dict[str, Any] = {
            "url": url,
            "client_id": client_id,
            "backoff_min_s": 0.1,
            "backoff_max_s": 0.5,
        }
        values.update(fields)
        link = MqttLink(LinkConfig.model_validate(values), will=will)
        links.append(link)
        return link

    yield build
    for link in links:
        link.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos1_round_trip(broker: Broker, make_link: LinkFactory, protocol: str) -> None:
    inbox = Inbox()
    subscriber = make_link(broker.url, f"sub-{protocol}", protocol=protocol)
    subscriber.subscribe("linesight/v1/stations/+/decision", inbox)
    subscriber.start()
    publisher = make_link(broker.url, f"pub-{protocol}", protocol=protocol)
    publisher.start()
    assert subscriber.wait_connected(WAIT_S)
    assert publisher.wait_connected(WAIT_S)
    # The SUBSCRIBE goes out on connect; a retained probe proves the broker has it.
    assert wait_until(lambda: _subscribed(publisher, inbox, "linesight/v1/stations/probe/decision"))

    tickets = [
        publisher.publish("linesight/v1/stations/s1/decision", f"part-{n}".encode())
        for n in range(20)
    ]
    assert all(ticket.wait(WAIT_S) for ticket in tickets)
    assert all(ticket.is_published() for ticket in tickets)
    assert len({ticket.mid for ticket in tickets}) == 20

    def decisions() -> list[ReceivedMessage]:
        return [m for m in inbox.messages if m.topic.endswith("s1/decision")]

    assert wait_until(lambda: len(decisions()) >= 20)
    received = decisions()
    assert [m.payload for m in received] == [f"part-{n}".encode() for n in range(20)]
    assert {m.qos for m in received} == {1}
    assert not any(m.retain for m in received)


def test_a_message_published_once_connected_reaches_the_links_own_subscription(
    broker: Broker, make_link: LinkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = Inbox()
    link = make_link(broker.url, "self-subscriber")
    link.subscribe("linesight/v1/stations/s1/decision", inbox)
    send_subscribe = link._send_subscribe

    def slow_subscribe(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)  # a busy network thread between CONNACK and its SUBSCRIBE
        send_subscribe(*args, **kwargs)

    monkeypatch.setattr(link, "_send_subscribe", slow_subscribe)
    link.start()
    assert link.wait_connected(WAIT_S)
    assert link.publish("linesight/v1/stations/s1/decision", b"first").wait(WAIT_S)
    assert inbox.wait_for(1) and inbox.payloads() == [b"first"]


def test_the_socket_sends_small_packets_at_once(broker: Broker, make_link: LinkFactory) -> None:
    """TCP_NODELAY: with Nagle on, a QoS 1 round trip could wait ~40 ms for a delayed ACK."""
    link = make_link(broker.url, "nodelay")
    link.start()
    assert link.wait_connected(WAIT_S)
    sock = link._client.socket()  # noqa: SLF001 - paho's socket, to read its options
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def _subscribed(publisher: MqttLink, inbox: Inbox, probe_topic: str) -> bool:
    """Publish a probe until the subscriber has seen one: its subscription is live."""
    if any(m.topic == probe_topic for m in inbox.messages):
        return True
    publisher.publish(probe_topic, b"probe", qos=1).wait(1.0)
    return wait_until(lambda: any(m.topic == probe_topic for m in inbox.messages), 0.3)


def test_last_will_is_published_when_the_station_dies(broker: Broker, tmp_path: Path) -> None:
    topic = "linesight/v1/stations/s7/state"
    watcher_inbox = Inbox()
    with MqttLink(LinkConfig(url=broker.url, client_id="watcher")) as watcher:
        watcher.subscribe(topic, watcher_inbox)
        assert watcher.wait_connected(WAIT_S)
        station = subprocess.Popen(
            [sys.executable, "-c", _STATION_SCRIPT, broker.url, topic],
            stdout=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda: b"online" in watcher_inbox.payloads())
            station.kill()  # SIGKILL by pid: no DISCONNECT packet, only a dead socket
            station.wait(WAIT_S)
            assert wait_until(lambda: b"offline" in watcher_inbox.payloads())
        finally:
            if station.poll() is None:
                station.kill()
                station.wait(WAIT_S)

    # The Will was retained: a dashboard that connects later still sees the station offline.
    late_inbox = Inbox()
    with MqttLink(LinkConfig(url=broker.url, client_id="late-dashboard")) as late:
        late.subscribe(topic, late_inbox)
        [state] = late_inbox.wait_for(1)
    assert state.payload == b"offline"
    assert state.retain


_STATION_SCRIPT = """
import sys, time
from linesight.mqtt import LinkConfig, MqttLink, Will
url, topic = sys.argv[1], sys.argv[2]
will = Will(topic=topic, payload=b"offline", qos=1, retain=True)
link = MqttLink(LinkConfig(url=url, client_id="station-s7", clean_start=True), will=will)
link.start()
if not link.wait_connected(10):
    sys.exit(1)
link.publish(topic, b"online", retain=True).wait(10)
time.sleep(60)
"""


def test_clean_stop_does_not_send_the_will(broker: Broker, make_link: LinkFactory) -> None:
    topic = "linesight/v1/stations/s8/state"
    inbox = Inbox()
    watcher = make_link(broker.url, "watcher")
    watcher.subscribe(topic, inbox)
    watcher.subscribe("linesight/test/marker", inbox)
    watcher.start()
    assert watcher.wait_connected(WAIT_S)
    station = make_link(broker.url, "station-s8", will=Will(topic, b"offline", qos=1, retain=True))
    station.start()
    assert station.wait_connected(WAIT_S)
    assert station.publish(topic, b"online", retain=True).wait(WAIT_S)
    assert wait_until(lambda: b"online" in inbox.payloads())

    station.stop()
    station.stop()  # idempotent
    assert not station.connected
    # The marker goes through the broker after the station's DISCONNECT: a Will would be first.
    assert watcher.publish("linesight/test/marker", b"marker").wait(WAIT_S)
    assert wait_until(lambda: b"marker" in inbox.payloads())
    assert b"offline" not in inbox.payloads()


@pytest.mark.parametrize("clean_start", [True, False], ids=["clean", "persistent"])
def test_subscriptions_come_back_after_broker_kill(
    broker: Broker, make_link: LinkFactory, clean_start: bool
) -> None:
    inbox = Inbox()
    connects: list[float] = []
    disconnects: list[float] = []
    subscriber = make_link(broker.url, "controller", clean_start=clean_start)
    subscriber.subscribe("linesight/v1/stations/+/verdict", inbox)
    subscriber.add_connect_listener(lambda: connects.append(time.monotonic()))
    subscriber.add_disconnect_listener(lambda: disconnects.append(time.monotonic()))
    subscriber.start()
    publisher = make_link(broker.url, "station-s1", clean_start=clean_start)
    publisher.start()
    assert subscriber.wait_connected(WAIT_S) and publisher.wait_connected(WAIT_S)

    broker.kill()
    assert wait_until(lambda: not subscriber.connected and len(disconnects) == 1)
    broker.restart()
    assert wait_until(lambda: subscriber.connected and len(connects) == 2)
    assert publisher.wait_connected(WAIT_S)

    # Nobody called subscribe() again: the link re-subscribed on its own.
    assert wait_until(
        lambda: _subscribed(publisher, inbox, "linesight/v1/stations/s1/verdict"), WAIT_S
    )
    assert publisher.publish("linesight/v1/stations/s2/verdict", b"after-restart").wait(WAIT_S)
    assert wait_until(lambda: b"after-restart" in inbox.payloads())


def test_persistent_session_keeps_queued_messages_across_broker_kill(
    broker: Broker, make_link: LinkFactory
) -> None:
    topic = "linesight/v1/stations/s1/cmd"
    # The session (its subscription, and what is queued for it) stays on the broker.
    leave_subscribed_session(LinkConfig(url=broker.url, client_id="station-s1"), topic)

    controller = make_link(broker.url, "controller")
    controller.start()
    assert controller.wait_connected(WAIT_S)
    tickets = [controller.publish(topic, f"cmd-{n}".encode()) for n in range(50)]
    assert all(ticket.wait(WAIT_S) for ticket in tickets)
    acked_at = time.time()
    # Power cut after the next autosave: what it wrote is all the broker keeps.
    db = broker.data_dir / "mosquitto.db"
    assert wait_until(lambda: db.exists() and db.stat().st_mtime > acked_at + 0.01)
    broker.kill()
    broker.restart()

    inbox = Inbox()
    second = make_link(broker.url, "station-s1")
    second.subscribe(topic, inbox)  # registered before start: queued messages find it
    second.start()
    received = inbox.wait_for(50)
    assert [m.payload for m in received] == [f"cmd-{n}".encode() for n in range(50)]


@pytest.mark.parametrize("forget", [True, False])
def test_a_forgotten_subscription_leaves_the_persistent_session(
    broker: Broker, make_link: LinkFactory, forget: bool
) -> None:
    """An older build subscribed under this client id; the new one forgets that filter."""
    topic = "linesight/v1/stations/s1/receipt"
    # The session (its subscription, and what is queued for it) stays on the broker.
    leave_subscribed_session(LinkConfig(url=broker.url, client_id="station-s1"), topic)

    new = make_link(broker.url, "station-s1")
    if forget:
        new.forget_subscription(topic)
    connected = threading.Event()
    new.add_connect_listener(connected.set)  # runs after the link's own (un)subscribes
    new.start()
    assert connected.wait(WAIT_S)
    new.stop()  # the UNSUBSCRIBE went out before the DISCONNECT, on the same socket

    controller = make_link(broker.url, "controller")
    controller.start()
    assert controller.wait_connected(WAIT_S)
    tickets = [controller.publish(topic, f"receipt-{n}".encode()) for n in range(5)]
    assert all(ticket.wait(WAIT_S) for ticket in tickets)

    queued = queued_for_session(
        LinkConfig(url=broker.url, client_id="station-s1"), topic, controller
    )
    assert queued == ([] if forget else [f"receipt-{n}".encode() for n in range(5)])


def test_forget_subscription_refuses_an_invalid_filter(make_link: LinkFactory) -> None:
    link = make_link("mqtt://127.0.0.1:1", "station-s1")
    with pytest.raises(ValueError, match="invalid MQTT topic filter"):
        link.forget_subscription("a/#/b")


def test_start_without_broker_connects_when_it_appears(
    tmp_path: Path, make_link: LinkFactory
) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    station = make_link(url, "station-s1")
    station.start()  # nothing listens yet: must not raise
    assert not station.wait_connected(0.3)
    assert station.fatal_error is None
    # Publishing while disconnected must not raise either; paho holds the QoS 1 message.
    ticket = station.publish("linesight/v1/stations/s1/state", b"online", retain=True)
    assert not ticket.is_published()

    with start_broker(tmp_path / "late-broker", port=port):
        assert station.wait_connected(WAIT_S)
        assert ticket.wait(WAIT_S)
        inbox = Inbox()
        dashboard = make_link(url, "dashboard")
        dashboard.subscribe("linesight/v1/stations/+/state", inbox)
        dashboard.start()
        [state] = inbox.wait_for(1)
        assert state.payload == b"online"
        assert station.connect_attempts >= 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("use_tool", [True, False], ids=["mosquitto_passwd", "written"])
def test_refused_credentials_are_retried_seldom_and_taken_once_fixed(
    tmp_path: Path, make_link: LinkFactory, protocol: str, use_tool: bool
) -> None:
    if use_tool and shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed; the written password file is still tested")
    password = secrets.token_urlsafe(16)
    password_file = write_password_file(
        tmp_path / "passwd", {"agent": password}, use_mosquitto_passwd=use_tool
    )
    with start_broker(tmp_path / "broker", password_file=password_file) as secured:
        refused = make_link(
            secured.url,
            "wrong-password",
            protocol=protocol,
            username="agent",
            password=password + "x",
            backoff_min_s=0.05,
            refused_retry_s=2.0,
        )
        refused.start()
        started = time.monotonic()
        assert not refused.wait_connected(WAIT_S)
        # Refused credentials end the wait at once instead of running out the timeout.
        assert time.monotonic() - started < WAIT_S / 2
        assert refused.fatal_error is not None
        assert "refused" in refused.fatal_error
        # Ten backoff periods later there has still been one attempt only.
        time.sleep(0.5)
        assert refused.connect_attempts == 1
        assert not refused.connected
        # The broker's password file now takes that password (reloaded on SIGHUP): the link
        # connects by itself at its next seldom try, with no restart.
        write_password_file(tmp_path / "passwd", {"agent": password + "x"},
                            use_mosquitto_passwd=use_tool)
        assert secured.pid is not None
        os.kill(secured.pid, signal.SIGHUP)
        assert refused.wait_connected(WAIT_S) or wait_until(lambda: refused.connected)
        assert refused.fatal_error is None
        assert refused.connect_attempts <= 4, "retried at the usual backoff, not seldom"
        password += "x"

        allowed = make_link(
            secured.url, "right-password", protocol=protocol, username="agent", password=password
        )
        allowed.start()
        assert allowed.wait_connected(WAIT_S)
        assert allowed.fatal_error is None


def test_raising_callback_does_not_stop_deliveries(
    broker: Broker, make_link: LinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox()

    def faulty(message: ReceivedMessage) -> None:
        if message.payload == b"poison":
            raise RuntimeError("consumer bug")
        inbox(message)

    subscriber = make_link(broker.url, "controller")
    subscriber.subscribe("linesight/v1/stations/+/shadow", faulty)
    subscriber.start()
    publisher = make_link(broker.url, "station-s1")
    publisher.start()
    assert subscriber.wait_connected(WAIT_S) and publisher.wait_connected(WAIT_S)
    with caplog.at_level(logging.ERROR, logger="linesight.mqtt"):
        assert wait_until(
            lambda: _subscribed(publisher, inbox, "linesight/v1/stations/probe/shadow")
        )
        for payload in (b"poison", b"after-1", b"poison", b"after-2"):
            publisher.publish("linesight/v1/stations/s1/shadow", payload)
        assert wait_until(lambda: b"after-2" in inbox.payloads())
    assert b"after-1" in inbox.payloads()
    assert any("consumer bug" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    assert subscriber.connected


def test_stop_before_start_and_twice(make_link: LinkFactory) -> None:
    link = make_link("mqtt://127.0.0.1:1", "never-started")
    link.stop()
    link.stop()
    assert not link.connected
    with pytest.raises(RuntimeError, match="stopped"):
        link.start()
