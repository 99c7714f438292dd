"""The outbox relay process on a real broker: receipts that must delete nothing, and SIGKILLs at
random points of its publish/receipt cycle."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

from edge_agent.relay import RelayProcess, RelaySpec
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import Collector, Receipter, wait_for
from tests.unit.test_store import decision

STATION = "st-1"
TOPICS = p.Topics()


def spec(data_dir: Path, url: str) -> RelaySpec:
    return RelaySpec(
        station=STATION, topic_prefix=p.DEFAULT_PREFIX, data_dir=data_dir,
        max_outbox_rows=1000, publish_batch=20, resend_after_s=5.0,
        broker=LinkConfig(url=url, client_id=STATION),
    )


def test_receipts_that_cover_nothing_of_this_store_delete_nothing(
    tmp_path: Path, broker: Broker
) -> None:
    collector = Collector(broker.url)
    controller = MqttLink(LinkConfig(url=broker.url, client_id="fake-controller"))
    controller.start()
    relay = RelayProcess(spec(tmp_path, broker.url))
    try:
        assert controller.wait_connected(10)
        with StationStore(tmp_path) as store:
            for n in range(10):
                store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"p{n}"))
            relay.start()
            relay.wake()
            wait_for(lambda: len(collector.unique(p.Decision, STATION)) == 10, 20, "10 rows sent")
            topic = TOPICS.station(STATION, p.Channel.RECEIPT)

            def send(body: bytes) -> None:
                assert controller.publish(topic, body, qos=1).wait(10)

            def receipt(upto: int, **fields: object) -> bytes:
                values: dict[str, object] = {
                    "station": STATION, "seq": 1, "upto_seq": upto, "upto_stream": store.stream,
                }
                values.update(fields)
                return p.Receipt(**values).to_json()  # type: ignore[arg-type]

            good = receipt(3)
            send(b"{not json")
            send(good.replace(b'"upto_seq":3', b'"upto_seq":-7'))
            send(good.replace(b'"upto_seq":3', b'"upto_seq":3.5'))
            send(good.replace(b'"upto_seq":3', b'"upto_seq":null'))
            send(good.replace(b'"station":"st-1"', b'"station":"st-1","extra":1'))
            send(receipt(9, station="st-2"))
            send(receipt(9, upto_stream=uuid.uuid4()))
            send(receipt(9, upto_stream=None))
            send(good)  # the one that counts: rows 0 to 3 go
            wait_for(lambda: store.outbox_depth() == 6, 20, "the valid receipt applied")
            send(receipt(1))  # backwards: nothing more to delete, nothing wrong
            send(receipt(-1))
            send(receipt(5))  # and it goes on
            wait_for(lambda: store.outbox_depth() == 4, 20, "the next valid receipt applied")
            assert [row.seq for row in store.pending()] == [6, 7, 8, 9]
            assert relay.alive(), "bad receipts must not stop the relay"
    finally:
        relay.stop()
        controller.stop()
        collector.close()


def test_sigkills_at_random_points_of_the_relays_cycle_lose_and_change_nothing(
    tmp_path: Path, broker: Broker
) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    receipter = Receipter(broker.url)
    relay = RelayProcess(spec(tmp_path, broker.url))
    topic = TOPICS.station(STATION, p.Channel.DECISION)
    msg_ids: dict[int, uuid.UUID] = {}
    try:
        with StationStore(tmp_path) as store:
            relay.start()
            for kill in range(8):
                for _ in range(rng.randrange(20, 120)):
                    message = store.enqueue(topic, 1, decision(f"part-{store.last_seq() + 1}"))
                    msg_ids[message.seq] = message.msg_id
                relay.wake()
                # Some time into its publish/receipt cycle: a random point of it.
                time.sleep(rng.uniform(0.0, 0.4))
                pid = relay.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not relay.alive(), 10, f"relay killed ({kill}, seed {seed})")
                relay.start()
                relay.wake()
            wait_for(lambda: store.outbox_depth() == 0, 60, f"every row receipted (seed {seed})")
            last = store.last_seq()
        stored = receipter.stored[STATION]
        assert sorted(stored) == list(range(last + 1)), f"seed {seed}: a message lost"
        for message in receipter.deliveries:
            assert message.msg_id == msg_ids[message.seq], (
                f"seed {seed}: seq {message.seq} went out as another message"
            )
    finally:
        relay.stop()
        receipter.close()
