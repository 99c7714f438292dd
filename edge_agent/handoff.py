"""The inspection loop's hand-over to the candidate worker: bounded, and never blocking.

`queue.Queue` does the same with a `threading.Condition` written in Python, which costs a few
microseconds of the interpreter lock per part on each side; here the items travel through the
C-implemented `queue.SimpleQueue` and only the count of unfinished items takes a plain lock.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class SkippingQueue(Generic[T]):
    """Hands items from one producer to one consumer. `offer` refuses an item (returns False)
    while `bound` items are waiting, so the producer never waits; `join` waits until every
    accepted item was marked done."""

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"bound must be >= 1, got {bound}")
        self.bound = bound
        self._items: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unfinished = 0

    def offer(self, item: T) -> bool:
        """Queue `item` unless `bound` items are already waiting (one producer only: the check
        and the put are not one step)."""
        if self._items.qsize() >= self.bound:
            return False
        with self._lock:
            self._unfinished += 1
        self._items.put(item)
        return True

    def get(self) -> T | None:
        """The next item, waiting for one; None once `close` was called and nothing is left."""
        return self._items.get()

    def done(self) -> None:
        """Mark an item from `get` as finished."""
        with self._lock:
            self._unfinished -= 1

    @property
    def unfinished(self) -> int:
        return self._unfinished

    def join(self, timeout: float | None = None, poll_s: float = 0.005) -> bool:
        """Wait until every accepted item is done (a shutdown step, so polling is fine)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._unfinished > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def close(self) -> None:
        """Wake the consumer with None (after the items already queued)."""
        self._items.put(None)
