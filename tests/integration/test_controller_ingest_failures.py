"""The controller's ingest thread when its SQLite store fails under it, over a real mosquitto.

Real failures of the real database: a trigger that makes the durable write reserving the
controller's seq block fail (as a full disk would), and another connection holding the write
lock past the busy timeout ("database is locked"). Each failure is logged and counted, the
thread goes on, the receipts it owes go out once it can send them, and what could not be stored
is stored when the station sends it again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.config import load_controller_config
from deploy.controller import Controller
from deploy.fleet_store import SqliteFleetStore
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import Collector, wait_for
from tests.unit.test_fleet_store import decision

FAIL_SEQ_RESERVATION = (
    "CREATE TRIGGER fail_seq_reservation BEFORE UPDATE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'disk full (injected by the test)'); END"
)


@pytest.fixture
def controller(tmp_path: Path, broker: Broker) -> Iterator[Controller]:
    config = load_controller_config(None, {
        "broker.url": broker.url, "data_dir": tmp_path / "fleet", "bundles": tmp_path,
    })
    store = SqliteFleetStore(config.data_dir / "fleet.db", busy_timeout_s=0.2)
    running = Controller(config, store=store)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def station(broker: Broker) -> Iterator[MqttLink]:
    link = MqttLink(LinkConfig(url=broker.url, client_id="station-s1"))
    link.start()
    assert link.wait_connected(10), "the station could not connect"
    yield link
    link.stop()


def database(controller: Controller) -> sqlite3.Connection:
    """Another connection to the controller's fleet.db, in autocommit mode."""
    return sqlite3.connect(controller.config.data_dir / "fleet.db", isolation_level=None)


def delivered(controller: Controller, station: MqttLink, message: p.Decision) -> None:
    """Publish `message` until the controller has stored it, sending it again now and then as
    the station's outbox does with anything not yet receipted."""
    topic = controller.topics.station(message.station, p.Channel.DECISION)

    def stored() -> bool:
        if controller.store.contiguous(message.station) >= message.seq:
            return True
        station.publish(topic, message.to_json(), qos=1).wait(5)
        return controller.store.contiguous(message.station) >= message.seq

    wait_for(stored, 60, f"seq {message.seq} stored")


def receipted(collector: Collector, upto: int) -> bool:
    return any(r.upto_seq >= upto for r in collector.of(p.Receipt, "s1"))


def test_the_ingest_thread_outlives_failed_writes_and_sends_what_it_owes(
    controller: Controller, station: MqttLink, broker: Broker
) -> None:
    collector = Collector(broker.url)
    ingest = next(t for t in controller._threads if t.name == "ingest")
    admin = database(controller)
    try:
        # The seq block a receipt needs cannot be reserved: the decision is stored, its receipt
        # stays owed.
        admin.execute(FAIL_SEQ_RESERVATION)
        delivered(controller, station, decision("s1", 0))
        counters = controller.counters
        wait_for(lambda: counters.failed_receipt_flushes >= 1 and counters.receipts_owed == 1,
                 30, "a failed receipt flush, the receipt owed")
        assert ingest.is_alive()
        assert not receipted(collector, 0)

        # Once the write works again, the owed receipt goes out without any new message.
        admin.execute("DROP TRIGGER fail_seq_reservation")
        wait_for(lambda: receipted(collector, 0), 30, "the owed receipt")
        wait_for(lambda: controller.counters.receipts_owed == 0, 30, "nothing owed")

        # Another process holds the write lock: the batch is not stored, nor receipted.
        admin.execute("BEGIN IMMEDIATE")
        topic = controller.topics.station("s1", p.Channel.DECISION)
        station.publish(topic, decision("s1", 1).to_json(), qos=1).wait(5)
        wait_for(lambda: controller.counters.failed_batches >= 1, 30, "a failed batch")
        assert ingest.is_alive()
        assert controller.store.contiguous("s1") == 0 and not receipted(collector, 1)
        admin.execute("COMMIT")

        # The station sends it again: stored and receipted.
        delivered(controller, station, decision("s1", 1))
        wait_for(lambda: receipted(collector, 1), 30, "the receipt of seq 1")
        assert ingest.is_alive()
    finally:
        admin.close()
        collector.close()

    app = create_app(controller).test_client()
    counters = app.get("/api/health").get_json()["ingest"]
    assert counters["failed_batches"] >= 1 and counters["failed_receipt_flushes"] >= 1
    assert counters["receipts_owed"] == 0
    metrics = app.get("/metrics").get_data(as_text=True)
    assert "linesight_fleet_ingest_failed_batches" in metrics
    assert "linesight_fleet_receipt_failures" in metrics
