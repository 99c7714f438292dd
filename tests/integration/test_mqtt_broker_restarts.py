"""A broker restarted several times in a row (`systemctl restart mosquitto` while its
configuration is being worked on), each time back before the link tries again: Debian's
mosquitto closes the connections without a reason, as it does for a client taken over by a twin,
but a restart is no other client with the link's client id. A real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest

from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import wait_for


@pytest.fixture
def link(broker: Broker) -> Iterator[MqttLink]:
    made = MqttLink(LinkConfig(url=broker.url, client_id="linesight-agent-press-01",
                               backoff_min_s=0.2, backoff_max_s=0.5))
    made.start()
    assert made.wait_connected(10)
    try:
        yield made
    finally:
        made.stop()


def test_quick_broker_restarts_are_no_conflict(broker: Broker, link: MqttLink) -> None:
    def back_or_in_conflict(attempts: int) -> bool:
        return link.conflict_error is not None or (
            link.connected and link.connect_attempts > attempts)

    for _ in range(4):
        attempts = link.connect_attempts
        broker.restart()  # back within ~0.15 s, before the link's next attempt (0.2 s)
        wait_for(partial(back_or_in_conflict, attempts), 10, "the link back after the restart")
        # Taken for a twin, the link would stay away for takeover_retry_s (30 s).
        assert link.conflict_error is None, link.conflict_error
