"""The relay's resend while no receipt comes (the controller down, the broker up): it must not
publish the whole outbox again and again without pause. Fake link and clock, real store."""

from __future__ import annotations

import contextlib
import sqlite3
import types
from pathlib import Path

import pytest

from edge_agent import relay as relay_module
from edge_agent.relay import OutboxRelay
from edge_agent.store import StationStore
from linesight import protocol as p
from tests.unit.test_relay import TOPICS, FakeLink, receipt
from tests.unit.test_store import STATION, decision

STEP_S = 0.5  # the fake clock moves this much per pass of the relay's loop
MAX_RESEND_WAIT_S = 300.0  # the documented cap: docs/agent.md, "The outbox"


def test_resends_without_a_receipt_come_ever_less_often_and_a_receipt_resets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(relay_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda _s: None,
    ))
    link = FakeLink()  # the broker takes every message; nobody receipts
    published_at: list[float] = []
    publish = link.publish

    def publish_noting_when(topic: str, payload: bytes, qos: int = 0) -> object:
        if p.parse(p.Decision, payload).seq == 0:
            published_at.append(clock[0])
        return publish(topic, payload, qos)

    link.publish = publish_noting_when  # type: ignore[method-assign]
    with StationStore(tmp_path) as store:
        for n in range(3):
            store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"p{n}"))
        relay = OutboxRelay(
            store, link, station=STATION, topics=TOPICS,  # type: ignore[arg-type]
            publish_batch=10, resend_after_s=10.0,
        )
        relay.on_connected()
        start = clock[0]
        receipted_at = start + 3600.0  # an hour without the controller, then a receipt
        published_after: list[int] = []

        def keep_going() -> bool:
            clock[0] += STEP_S
            if clock[0] == receipted_at:
                relay.on_receipt(receipt(0, store.stream))
                link.published.clear()
            relay.wake.set()
            return clock[0] <= receipted_at + 10.0 + 3 * STEP_S

        relay.run(keep_going)
        published_at = [t for t in published_at if t < receipted_at]
        gaps = [b - a for a, b in zip(published_at, published_at[1:], strict=False)]
        assert gaps[0] <= 10.0 + 2 * STEP_S, "the first resend after resend_after_s"
        assert all(b >= a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
        assert gaps[1] >= 2 * 10.0 and gaps[2] >= 4 * 10.0, f"each wait doubles: {gaps}"
        assert max(gaps) <= MAX_RESEND_WAIT_S + 2 * STEP_S, gaps
        assert len(published_at) < 3600 / MAX_RESEND_WAIT_S + 8, (
            f"the outbox went out {len(published_at)} times in an hour"
        )
        # The controller is back: its receipt deleted seq 0 and reset the wait.
        assert store.outbox_depth() == 2
        published_after = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
        assert published_after == [1, 2], "what is left goes again after resend_after_s"


def test_a_receipt_the_store_cannot_apply_leaves_its_rows_to_be_sent_and_receipted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """station.db locked by another process when a receipt comes: the rows stay, and the relay
    must not take them for receipted (it would never send them again, nor hear another receipt
    for them on an idle line)."""
    clock = [1000.0]
    monkeypatch.setattr(relay_module, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda _s: None,
    ))
    link = FakeLink()
    with StationStore(tmp_path) as store:
        for n in range(3):
            store.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"p{n}"))
        relay = OutboxRelay(
            store, link, station=STATION, topics=TOPICS,  # type: ignore[arg-type]
            publish_batch=10, resend_after_s=10.0,
        )
        acknowledge = store.acknowledge
        locked = [True]

        def acknowledge_unless_locked(upto_seq: int) -> int:
            if locked[0]:
                raise sqlite3.OperationalError("database is locked")
            return acknowledge(upto_seq)

        monkeypatch.setattr(store, "acknowledge", acknowledge_unless_locked)
        relay.on_connected()

        def deliver(upto: int) -> None:
            with contextlib.suppress(Exception):  # as the link does: logged, deliveries go on
                relay.on_receipt(receipt(upto, store.stream))

        def keep_going() -> bool:
            clock[0] += STEP_S
            if clock[0] == 1001.0:  # the first pass has sent the rows: the controller answers
                deliver(2)
                locked[0] = False
            elif len(link.published) > 3 and store.outbox_depth() == 3:
                deliver(2)  # the answer to the resend
            relay.wake.set()
            return clock[0] <= 1060.0 and store.outbox_depth() > 0

        relay.run(keep_going)
        seqs = [p.parse(p.Decision, payload).seq for _, payload, _ in link.published]
        assert store.outbox_depth() == 0, f"rows left after the locked receipt; sent {seqs}"
        assert seqs == [0, 1, 2, 0, 1, 2], "sent again, once, with the same seqs"
