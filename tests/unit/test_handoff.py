"""The candidate hand-over: bounded, never blocking the producer, joinable."""

from __future__ import annotations

import threading

import pytest

from edge_agent.handoff import SkippingQueue

pytestmark = pytest.mark.unit


def test_offer_refuses_while_bound_items_wait() -> None:
    jobs: SkippingQueue[int] = SkippingQueue(2)
    assert jobs.offer(1) and jobs.offer(2)
    assert not jobs.offer(3)  # refused at once, never waits
    assert jobs.get() == 1
    assert jobs.offer(4)  # one waiting again: room for one more
    assert [jobs.get(), jobs.get()] == [2, 4]
    assert jobs.unfinished == 3


def test_join_waits_for_every_accepted_item_and_close_wakes_the_consumer() -> None:
    jobs: SkippingQueue[int] = SkippingQueue(8)
    seen: list[int] = []
    release = threading.Event()

    def consume() -> None:
        while (item := jobs.get()) is not None:
            release.wait(5)
            seen.append(item)
            jobs.done()

    worker = threading.Thread(target=consume)
    worker.start()
    for item in range(5):
        assert jobs.offer(item)
    assert not jobs.join(timeout=0.05)  # the consumer is held
    release.set()
    assert jobs.join(timeout=5)
    assert seen == [0, 1, 2, 3, 4] and jobs.unfinished == 0
    jobs.close()
    worker.join(5)
    assert not worker.is_alive()


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bound"):
        SkippingQueue(0)
