"""A backlog larger than the controller's inbox, over a real mosquitto and a real station outbox
relay: while the store lags, the rest waits in the broker and in the station's outbox; a
controller stopped meanwhile stops without hanging, and the next one stores every message."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deploy import controller as controller_module
from deploy.config import ControllerConfig, load_controller_config
from deploy.controller import Controller
from edge_agent.relay import RelayProcess, RelaySpec
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig
from tests.support import wait_for
from tests.unit.test_controller_inbox import GatedStore, inbox_full
from tests.unit.test_store import STATION, decision

LIMIT = 64 * 1024
MESSAGES = 3000  # about 1.5 MB of decisions in the station's outbox


def controller_config(root: Path, broker: Broker) -> ControllerConfig:
    return load_controller_config(None, {
        "broker.url": broker.url, "data_dir": root / "fleet", "bundles": root,
        "ingest_batch": 50,
    })


def test_a_backlog_beyond_the_inbox_is_stored_in_full_across_a_stop(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "INBOX_MAX_BYTES", LIMIT)
    config = controller_config(tmp_path, broker)
    gated = GatedStore(config.data_dir / "fleet.db")
    first = Controller(config, store=gated)
    first.start()
    relay = RelayProcess(RelaySpec(
        station=STATION, topic_prefix=p.DEFAULT_PREFIX, data_dir=tmp_path / "station",
        max_outbox_rows=10 * MESSAGES, publish_batch=200, resend_after_s=5.0,
        broker=LinkConfig(url=broker.url, client_id=STATION),
    ))
    second: Controller | None = None
    try:
        with StationStore(tmp_path / "station") as station:
            topic = p.Topics().station(STATION, p.Channel.DECISION)
            station.enqueue_many([(topic, 1, decision(f"part-{n}")) for n in range(MESSAGES)])
            relay.start()
            relay.wake()
            # The store lags: the network thread waits for room, the rest stays outside.
            wait_for(lambda: inbox_full(first), 60, "the controller's network thread to wait")
            inbox = first._inbox  # noqa: SLF001
            assert inbox.held_bytes <= LIMIT, inbox.held_bytes
            assert station.outbox_depth() == MESSAGES, "nothing was receipted"
            # Stopped while its network thread waits: it must not hang.
            stopper = threading.Thread(target=first.stop, daemon=True)
            stopper.start()
            wait_for(first._stop.is_set, 30, "stop() to begin")  # noqa: SLF001
            gated.gate.set()
            wait_for(lambda: not stopper.is_alive(), 60, "the first controller to stop")
            # The next controller gets the broker's queue for its session, and the station
            # sends again what the first took but never stored.
            second = Controller(config)
            second.start()
            wait_for(lambda: station.outbox_depth() == 0, 180, "every message receipted")
            stored = second.store.decisions(STATION)
            assert sorted(d.seq for d in stored) == list(range(MESSAGES))
    finally:
        gated.gate.set()
        relay.stop()
        first.stop()
        if second is not None:
            second.stop()
