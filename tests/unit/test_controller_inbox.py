"""The controller's inbox, between paho's network thread and the ingest thread, is bounded: with
a store slower than the stations, the backlog waits in the broker and the stations' outboxes,
not in the controller's memory, and nothing of it is lost.

The controller is started on a broker address where nothing listens (its link retries in the
background); the test calls the subscribed callbacks as paho's network thread would."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy import controller as controller_module
from deploy.api import _metrics
from deploy.config import ControllerConfig
from deploy.controller import Controller
from deploy.fleet_store import SqliteFleetStore, StreamKey
from linesight import protocol as p
from linesight.mqtt import LinkConfig, ReceivedMessage
from tests.support import wait_for
from tests.unit.test_fleet_store import decision

LIMIT = 64 * 1024  # the inbox's bound in this test, in bytes
MESSAGES = 2000  # about 1.4 MB of decisions: twenty times the bound


class GatedStore(SqliteFleetStore):
    """A store that stores nothing until `gate` is set: far slower than the stations."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def ingest(
        self, messages: Sequence[p.Envelope], received: datetime | None = None
    ) -> dict[StreamKey, int]:
        self.waiting.set()
        assert self.gate.wait(120), "the test never opened the store"
        return super().ingest(messages, received)


@pytest.fixture
def gated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Controller, Callable[[ReceivedMessage], None]]]:
    """A started controller over a GatedStore, and the callback paho calls with a decision."""
    monkeypatch.setattr(controller_module, "INBOX_MAX_BYTES", LIMIT, raising=False)
    config = ControllerConfig(
        broker=LinkConfig(url="mqtt://127.0.0.1:1", client_id="unit-controller"),
        data_dir=tmp_path / "fleet", bundles=tmp_path, ingest_batch=10,
    )
    store = GatedStore(config.data_dir / "fleet.db")
    controller = Controller(config, store=store)
    callbacks: dict[str, Callable[[ReceivedMessage], None]] = {}

    def subscribe(topic_filter: str, callback: Callable[[ReceivedMessage], None],
                  qos: int = 1) -> None:
        callbacks[topic_filter] = callback

    monkeypatch.setattr(controller.link, "subscribe", subscribe)
    controller.start()
    try:
        yield controller, callbacks[controller.topics.every_station(p.Channel.DECISION)]
    finally:
        store.gate.set()
        controller.stop()


def message(seq: int) -> ReceivedMessage:
    topic = p.Topics(p.DEFAULT_PREFIX).station("s1", p.Channel.DECISION)
    return ReceivedMessage(topic, decision("s1", seq).to_json(), 1, False)


class Network:
    """paho's network thread: hands the controller `count` decisions, one after the other."""

    def __init__(self, deliver: Callable[[ReceivedMessage], None], count: int) -> None:
        self.handed = 0
        self.thread = threading.Thread(target=self._run, args=(deliver, count), daemon=True)
        self.thread.start()

    def _run(self, deliver: Callable[[ReceivedMessage], None], count: int) -> None:
        for seq in range(count):
            deliver(message(seq))
            self.handed += 1


def inbox_full(controller: Controller) -> bool:
    return bool(controller._inbox.full())  # noqa: SLF001 - what paho's thread waits on


def test_a_backlog_faster_than_the_store_waits_outside_the_controller(
    gated: tuple[Controller, Callable[[ReceivedMessage], None]],
) -> None:
    controller, deliver = gated
    store = controller.store
    assert isinstance(store, GatedStore)
    network = Network(deliver, MESSAGES)
    wait_for(lambda: not network.thread.is_alive() or inbox_full(controller), 60,
             "the network thread to finish or to wait for room")
    assert network.thread.is_alive(), (
        f"the inbox took all {MESSAGES} messages while the store stored none: nothing bounds it"
    )
    size = len(message(0).payload)
    # All the controller holds: its inbox (the bound, and at most one message over it) and
    # the batch the ingest thread is storing.
    most = LIMIT + (1 + controller.config.ingest_batch) * size
    assert network.handed * size <= most, f"{network.handed} messages of {size} bytes taken"
    store.gate.set()
    wait_for(lambda: store.contiguous("s1") == MESSAGES - 1, 120, "every message stored")
    network.thread.join(30)
    assert not network.thread.is_alive() and network.handed == MESSAGES
    # The waits show on /metrics once the ingest thread counted them after a batch.
    wait_for(lambda: controller.counters.inbox_waits >= 1, 30, "the waits counted")
    gauges = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(_metrics(controller).decode())
        if family.samples  # the per-station families: no station has reported
    }
    assert gauges["linesight_fleet_inbox_waits"] >= 1
    assert gauges["linesight_fleet_inbox_bytes"] == controller.counters.inbox_bytes


def test_stopping_with_the_network_thread_waiting_for_room_does_not_hang(
    gated: tuple[Controller, Callable[[ReceivedMessage], None]],
) -> None:
    """The network thread waits on a full inbox; stop() must end it (paho's loop_stop joins
    it), and the ingest thread must finish the batch it was storing."""
    controller, deliver = gated
    store = controller.store
    assert isinstance(store, GatedStore)
    network = Network(deliver, MESSAGES)
    wait_for(lambda: inbox_full(controller), 60, "the network thread to wait for room")
    stopper = threading.Thread(target=controller.stop, daemon=True)
    stopper.start()
    wait_for(controller._stop.is_set, 30, "stop() to begin")  # noqa: SLF001
    store.gate.set()
    wait_for(lambda: not stopper.is_alive(), 60, "stop() to return")
    wait_for(lambda: not network.thread.is_alive(), 30, "the network thread to be let go")
    assert controller.counters.stored >= 1 and controller.counters.failed_batches == 0
    with SqliteFleetStore(controller.config.data_dir / "fleet.db") as reopened:
        stored = reopened.contiguous("s1") + 1
    assert stored == controller.counters.stored, "what was taken before the stop was stored"
