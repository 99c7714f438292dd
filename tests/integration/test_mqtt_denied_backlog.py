"""A large backlog that the broker's ACL refuses (a station connecting with another station's
user name): Mosquitto answers the first refused publish with a PUBACK "Not authorized" and
closes the connection while the rest of the burst is still unread, which resets it, and the
refusal is thrown away unread. The link must still report the refusal, naming the topic, and not
take the closes for another client with its client id. A real Mosquitto with the ACL of
docs/deploy.md."""

from __future__ import annotations

import logging
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from linesight.broker import Broker, start_broker, write_password_file
from linesight.mqtt import LinkConfig, MqttLink
from tests.integration.test_agent_broker_denied import deploy_guide_acl
from tests.support import wait_for

BACKLOG = 3000
REFUSED_TOPIC = "linesight/v1/stations/press-02/decision"  # press-01 may not write there


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    """Mosquitto with the deploy guide's ACL and one user, press-01; yields it and the password."""
    password = secrets.token_urlsafe(16)
    passwd = write_password_file(tmp_path / "passwd", {"press-01": password})
    acl = tmp_path / "linesight.acl"
    acl.write_text(deploy_guide_acl())
    with start_broker(tmp_path / "broker", password_file=passwd, acl_file=acl) as broker:
        yield broker, password


@pytest.fixture
def link(acl_broker: tuple[Broker, str]) -> Iterator[MqttLink]:
    broker, password = acl_broker
    made = MqttLink(LinkConfig(
        url=broker.url, client_id="linesight-agent-press-02-outbox", username="press-01",
        password=password, backoff_min_s=0.1, backoff_max_s=0.5, refused_retry_s=0.2,
        takeover_retry_s=0.2,
    ))
    made.start()
    assert made.wait_connected(10)
    try:
        yield made
    finally:
        made.stop()


def test_a_refused_backlog_is_reported_as_refused_not_as_a_twin(link: MqttLink) -> None:
    for number in range(BACKLOG):
        link.publish(REFUSED_TOPIC, b"%d" % number, qos=1)
    wait_for(lambda: link.denied_error is not None or link.conflict_error is not None, 10,
             "the link to report why the broker closes its connections")
    attempts = link.connect_attempts
    # A few more rounds of connect, refusal, close: still no twin.
    wait_for(lambda: link.connect_attempts >= attempts + 4, 10, "four more connects")
    assert link.conflict_error is None, link.conflict_error
    error = link.denied_error or ""
    assert error.startswith(f"the broker refuses to take messages on {REFUSED_TOPIC}"), error
    assert "Not authorized" in error and "ACL" in error, error


def test_the_backlog_goes_through_once_the_acl_takes_it(
    acl_broker: tuple[Broker, str], link: MqttLink
) -> None:
    broker, _ = acl_broker
    for number in range(BACKLOG):
        link.publish(REFUSED_TOPIC, b"%d" % number, qos=1)
    wait_for(lambda: link.denied_error is not None, 10, "the refusal")
    assert broker.acl_file is not None and broker.pid is not None
    broker.acl_file.write_text(deploy_guide_acl() + "\nuser press-01\n"
                               "topic write linesight/v1/stations/press-02/#\n")
    os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads its ACL file
    wait_for(lambda: link.unacknowledged == 0, 20, "the whole backlog acknowledged")
    assert link.denied_error is None
    assert link.conflict_error is None


def test_a_reset_connection_is_no_error_line(
    link: MqttLink, caplog: pytest.LogCaptureFixture
) -> None:
    # Each refusal here ends in a reset connection, and paho logs the read that failed on it at
    # ERROR. The link's own lines already say what happened (a warning naming the socket error,
    # the refusal once): alerts fire on ERROR lines, and a refusal repeats every retry.
    with caplog.at_level(logging.DEBUG, logger="linesight.mqtt"):
        for number in range(BACKLOG):
            link.publish(REFUSED_TOPIC, b"%d" % number, qos=1)
        wait_for(lambda: link.denied_error is not None, 10, "the refusal")
        attempts = link.connect_attempts
        wait_for(lambda: link.connect_attempts >= attempts + 2, 10, "two more connects")
    resets = [r for r in caplog.records if r.getMessage().startswith("failed to receive")]
    assert resets, "no reset seen: the test no longer shows what it is about"
    assert all(r.levelno == logging.DEBUG for r in resets), [r.levelname for r in resets]
