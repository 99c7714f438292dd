"""The outbox relay's logic: what it publishes, what a receipt deletes, its MQTT identity."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import store as store_module
from edge_agent.relay import OutboxRelay, RelaySpec, Restarts, relay_link_config
from edge_agent.store import DB_FILE, StationStore
from linesight import protocol as p
from linesight.mqtt import LinkConfig, ReceivedMessage
from linesight.sqlite_db import SqliteDatabase
from tests.support import wait_for
from tests.unit.test_store import STATION, decision

pytestmark = pytest.mark.unit

TOPICS = p.Topics()


class Ticket:
    def __init__(self, acked: bool) -> None:
        self.acked = acked

    def wait(self, timeout: float) -> bool:
        return self.acked


class FakeLink:
    """Records publishes; its broker acknowledges them unless told not to."""

    def __init__(self) -> None:
        self.connected = True
        self.acks = True
        self.keeps = False
        self.published: list[tuple[str, bytes, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> Ticket:
        self.published.append((topic, payload, qos))
        return Ticket(self.acks)

    def holds(self, ticket: Ticket) -> bool:
        """An unacknowledged message stays with the link to go again at the next connect,
        unless told otherwise."""
        return self.keeps and not ticket.acked


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    with StationStore(tmp_path) as opened:
        for n in range(5):
            opened.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"part-{n}"))
        yield opened


def relay_on(store: StationStore, link: FakeLink, batch: int = 2) -> OutboxRelay:
    return OutboxRelay(
        store, link, station=STATION, topics=TOPICS,  # type: ignore[arg-type]
        publish_batch=batch, resend_after_s=10.0,
    )


def receipt(
    upto: int, stream: uuid.UUID | None, station: str = STATION
) -> ReceivedMessage:
    body = p.Receipt(station=station, seq=1, upto_seq=upto, upto_stream=stream)
    return ReceivedMessage(TOPICS.station(station, p.Channel.RECEIPT), body.to_json(), 1, False)


def test_publishes_every_pending_row_in_seq_order_in_batches(store: StationStore) -> None:
    link = FakeLink()
    assert relay_on(store, link).publish_pending(-1) == 4
    seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
    assert seqs == [0, 1, 2, 3, 4]
    assert {qos for _, _, qos in link.published} == {1}
    assert store.outbox_depth() == 5, "a PUBACK deletes nothing: only a receipt does"


def test_a_woken_relay_lingers_so_that_the_next_commits_join_its_batch(
    store: StationStore,
) -> None:
    link = FakeLink()
    relay = OutboxRelay(
        store, link, station=STATION, topics=TOPICS,  # type: ignore[arg-type]
        publish_batch=100, resend_after_s=10.0, linger_s=0.4,
    )
    relay.on_connected()  # online, and a wake-up for the 5 rows already stored
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(lambda: not stop.is_set(),))
    runner.start()
    try:
        time.sleep(0.1)
        assert link.published == [], "woken, the relay waits for the commits that follow"
        for n in range(5, 8):
            store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"part-{n}"))
            relay.wake.set()
        wait_for(lambda: len(link.published) == 8, 5, "the 8 rows")
    finally:
        stop.set()
        relay.wake.set()
        runner.join(5)
    seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
    assert seqs == list(range(8))


def test_an_unacknowledged_batch_is_published_again_from_where_it_was(
    store: StationStore,
) -> None:
    link = FakeLink()
    link.acks = False
    relay = relay_on(store, link)
    assert relay.publish_pending(-1) == -1
    link.acks = True
    assert relay.publish_pending(-1) == 4
    seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
    assert seqs == [0, 1, 0, 1, 2, 3, 4]


def test_a_row_the_link_still_holds_is_not_handed_to_it_again(store: StationStore) -> None:
    """The link sends an unacknowledged message again by itself at each reconnect: another copy
    per replay would pile up in memory while a broker keeps dropping the connection."""
    link = FakeLink()
    link.acks, link.keeps = False, True
    relay = relay_on(store, link)
    assert relay.publish_pending(-1) == -1
    assert relay.publish_pending(-1) == -1  # a replay after a reconnect
    assert [p.parse(p.Decision, payload).seq for _, payload, _ in link.published] == [0, 1]


def test_a_receipt_deletes_up_to_its_seq_and_others_change_nothing(
    store: StationStore,
) -> None:
    acknowledged: list[int] = []
    relay = OutboxRelay(
        store, FakeLink(), station=STATION, topics=TOPICS,  # type: ignore[arg-type]
        publish_batch=2, resend_after_s=10.0, on_acknowledged=acknowledged.append,
    )
    assert store.stream is not None, "a new store numbers its messages in a stream of its own"
    relay.publish_pending(-1)
    relay.on_receipt(receipt(2, store.stream))
    assert store.outbox_depth() == 2 and acknowledged == [2]
    relay.on_receipt(receipt(4, store.stream, station="other-station"))
    relay.on_receipt(ReceivedMessage("x", b"{not json", 1, False))
    relay.on_receipt(receipt(1, store.stream))  # an old receipt again: nothing left to delete
    assert store.outbox_depth() == 2 and acknowledged == [2]


def test_a_receipt_for_another_seq_stream_deletes_nothing(store: StationStore) -> None:
    """What the broker kept for this station id before its storage was replaced (a stream of
    its own, or none at all) counts seqs that are not this store's."""
    relay = relay_on(store, FakeLink())
    relay.publish_pending(-1)
    relay.on_receipt(receipt(4, uuid.uuid4()))
    relay.on_receipt(receipt(4, None))
    assert store.outbox_depth() == 5
    relay.on_receipt(receipt(4, store.stream))
    assert store.outbox_depth() == 0


def test_a_store_from_before_streams_takes_receipts_that_name_none(tmp_path: Path) -> None:
    """A station upgraded with its outbox full goes on in the controller's unnamed stream."""
    old = SqliteDatabase(tmp_path / DB_FILE, synchronous="FULL", busy_timeout_s=5.0)
    old.migrate(store_module._MIGRATIONS[:1])  # schema 1: no streams yet
    with old.write() as conn:
        conn.execute("UPDATE outbox_meta SET next_seq = 7")
    old.close()
    with StationStore(tmp_path) as store:
        assert store.stream is None
        for n in range(3):
            store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"p{n}"))
        relay = relay_on(store, FakeLink())
        relay.publish_pending(-1)
        relay.on_receipt(receipt(8, uuid.uuid4()))
        assert store.outbox_depth() == 3
        relay.on_receipt(receipt(8, None))
        assert [row.seq for row in store.pending()] == [9]


def test_the_relay_has_its_own_client_id_within_mqtts_limit() -> None:
    base = LinkConfig(url="mqtt://127.0.0.1:1883", client_id="press-01")
    assert relay_link_config(base).client_id == "press-01-outbox"
    assert relay_link_config(base).url == base.url
    long = base.model_copy(update={"client_id": "s" * 128})
    relay_id = relay_link_config(long).client_id
    assert len(relay_id) == 128 and relay_id.endswith("-outbox")


def test_a_relay_that_keeps_dying_is_started_again_later_and_later() -> None:
    restarts = Restarts()
    starts = []
    now = 0.0
    while now < 70:
        if restarts.may_start(now):  # the relay is found dead at every look, every 0.5 s
            restarts.started(now)
            starts.append(now)
        now += 0.5
    assert starts == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 61.0]


def test_a_relay_that_ran_long_enough_is_healthy_once_and_resets_the_delay() -> None:
    restarts = Restarts()
    for at in (0.0, 0.0, 1.0):
        restarts.started(at)
    assert restarts.delay_s == 4.0
    assert not restarts.healthy(5.0)
    assert restarts.healthy(11.0)
    assert not restarts.healthy(12.0), "reported once"
    assert restarts.may_start(20.0), "after a healthy run, the next death restarts at once"
    restarts.started(20.0)
    assert restarts.delay_s == 1.0 and not restarts.may_start(20.5)


def test_the_spec_carries_every_broker_setting_to_the_child(tmp_path: Path) -> None:
    broker = LinkConfig(
        url="mqtts://line:8883", client_id="press-01", username="press-01",
        password="secret",  # noqa: S106 - a test value
        ca_file=tmp_path / "ca.pem", protocol="3.1.1", keepalive=15,
    )
    spec = RelaySpec(
        station="press-01", topic_prefix="linesight/v1", data_dir=tmp_path, max_outbox_rows=100,
        publish_batch=50, resend_after_s=5.0, broker=broker,
    )
    assert RelaySpec.model_validate_json(spec.model_dump_json()) == spec
    assert "secret" not in repr(spec), "the password never reaches a log line"


def test_nothing_goes_out_between_the_link_connecting_and_its_connect_listener(
    store: StationStore,
) -> None:
    """paho reports connected before the listeners run; the replay they ask for sends the rows:
    a pass in between would send them twice."""
    link = FakeLink()  # connected, but the relay has not heard of it yet
    relay = relay_on(store, link, batch=10)
    calls = 0

    def keep_going() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            relay.on_connected()  # the connect listener, one pass later
        relay.wake.set()
        return calls <= 2

    relay.run(keep_going)
    seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
    assert seqs == [0, 1, 2, 3, 4], "each row once, after the connect listener"


def test_a_receipt_deletes_only_rows_this_relay_has_sent(store: StationStore) -> None:
    """A receipt says what the controller holds under each seq. A row not sent yet may hold
    another message under a seq the controller holds (a store restored from a backup gives out
    seqs again), and a receipt the broker kept from before this relay started covers rows it
    has not sent again yet: either way the controller may not have that row's message."""
    relay = relay_on(store, FakeLink())
    relay.on_receipt(receipt(4, store.stream))
    assert store.outbox_depth() == 5, "nothing sent yet: nothing deleted"
    assert store.receipted_upto() == -1, "nothing reported as receipted"
    relay.publish_pending(-1)
    relay.on_receipt(receipt(4, store.stream))
    assert store.outbox_depth() == 0


def test_a_receipt_beyond_the_last_seq_given_out_deletes_what_was_sent_and_warns(
    store: StationStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller holds seqs this store never gave out: the store was restored from a
    backup. The controller stores a message under a taken seq beside the first, so what was
    sent is safe to delete; rows given out since are not sent yet and stay."""
    link = FakeLink()
    relay = relay_on(store, link, batch=10)
    relay.publish_pending(-1)
    store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision("part-5"))
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        relay.on_receipt(receipt(1000, store.stream))
        relay.on_receipt(receipt(1000, store.stream))
    assert [row.seq for row in store.pending()] == [5]
    assert store.receipted_upto() == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "warned once, not on every receipt"
    assert "covers seq 1000" in warnings[0] and "given out seqs up to 5 only" in warnings[0]
    assert "restored from a backup" in warnings[0]


def test_a_receipt_from_the_future_does_not_stop_the_resend_of_unreceipted_rows(
    store: StationStore,
) -> None:
    link = FakeLink()
    relay = OutboxRelay(
        store, link, station=STATION, topics=TOPICS,  # type: ignore[arg-type]
        publish_batch=10, resend_after_s=0.5,
    )
    relay.on_connected()
    relay.on_receipt(receipt(1000, store.stream))
    passes = 0

    def keep_going() -> bool:
        nonlocal passes
        passes += 1
        if passes == 2:
            time.sleep(0.6)  # receipts stop coming for longer than resend_after_s
        relay.wake.set()
        return passes <= 3

    relay.run(keep_going)
    seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
    assert seqs == [0, 1, 2, 3, 4] * 2, "published, then again when no receipt covered them"
