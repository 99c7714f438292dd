"""Group commit for the station's outbox.

An fsync costs milliseconds on a line-side SSD, far more than the models' inference, so one
commit per message would make the disk, not the models, set the line's pace. The inspection
loop hands its messages to this writer and goes on with the next part; the writer commits
everything waiting in ONE transaction (synchronous=FULL), and only then runs what must follow a
durable record: the reject gate, the publisher wake-up, review images, the part log. A message
is therefore never acted on or published before it is on disk. Review items of a batch are
stored together too (one commit for their rows, one directory sync for their images).

Not everything is urgent. A decision is (the reject gate waits for its commit), and so is a
task someone waits for; shadow results, the part log and review items are not. Those wait for
the next urgent item, at most `lazy_s`, and ride its commit: with a candidate in shadow that is
one commit and one publisher wake-up per part instead of two, which is background work the
inspection loop no longer competes with for the interpreter.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.store import PartLogEntry, ReviewItem, StationStore
from linesight.protocol import Envelope

log = logging.getLogger(__name__)

After = Callable[[Envelope | Exception], None]


@dataclass(frozen=True, slots=True)
class _Enqueue:
    topic: str
    qos: int
    factory: Callable[[int], Envelope]
    after: After | None
    urgent: bool = True


@dataclass(frozen=True, slots=True)
class _Task:
    run: Callable[[], None]


@dataclass(frozen=True, slots=True)
class _PartLog:
    entry: PartLogEntry


@dataclass(frozen=True, slots=True)
class _Review:
    build: Callable[[], ReviewItem | None]


_Item = _Enqueue | _Task | _PartLog | _Review


def _urgent(item: _Item) -> bool:
    return isinstance(item, _Task) or (isinstance(item, _Enqueue) and item.urgent)


class DurableWriter:
    def __init__(
        self,
        store: StationStore,
        *,
        max_batch: int = 256,
        lazy_s: float = 0.05,
        name: str = "writer",
        on_reviews: Callable[[str | None], None] | None = None,
    ) -> None:
        """`on_reviews` hears after each batch of review items: None, or what went wrong."""
        if lazy_s < 0 or max_batch < 1:
            raise ValueError("lazy_s must be >= 0 and max_batch >= 1")
        self.store = store
        self.on_reviews = on_reviews
        self.max_batch = max_batch
        self.lazy_s = lazy_s
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def enqueue(
        self,
        topic: str,
        qos: int,
        factory: Callable[[int], Envelope],
        after: After | None = None,
        *,
        urgent: bool = True,
    ) -> None:
        """Store a message in the outbox soon; `after` gets the stored message (or the error).
        A message that is not `urgent` may wait up to `lazy_s` for the next urgent one."""
        self._queue.put(_Enqueue(topic, qos, factory, after, urgent))

    def log_part(self, entry: PartLogEntry) -> None:
        """Add a part to the statistics log, in the same batch as the messages around it."""
        self._queue.put(_PartLog(entry))

    def review(self, build: Callable[[], ReviewItem | None]) -> None:
        """Queue a part for review after the messages submitted before it are stored; `build`
        runs on the writer thread (it may encode the image) and returns None to skip."""
        self._queue.put(_Review(build))

    def later(self, task: Callable[[], None]) -> None:
        """Run `task` on the writer thread after the messages submitted before it are stored."""
        self._queue.put(_Task(task))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is done."""
        done = threading.Event()
        self.later(done.set)
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        batch: list[_Item] = []
        oldest = 0.0  # when the first item of `batch` arrived
        closing = False
        while not closing:
            # Only lazy items waiting: wake when the oldest has waited lazy_s.
            timeout = max(0.0, oldest + self.lazy_s - time.monotonic()) if batch else None
            try:
                arrived = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                arrived = []
            while arrived and len(batch) + len(arrived) < self.max_batch:
                try:
                    arrived.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                oldest = time.monotonic()
            closing = None in arrived
            fresh = [item for item in arrived if item is not None]
            batch.extend(fresh)
            if (
                not arrived  # the lazy items waited long enough
                or closing
                or len(batch) >= self.max_batch
                or any(_urgent(item) for item in fresh)
            ) and batch:
                self._process(batch)
                batch = []

    def _process(self, batch: list[_Item]) -> None:
        writes = [item for item in batch if isinstance(item, _Enqueue)]
        logged = [item.entry for item in batch if isinstance(item, _PartLog)]
        results: list[Envelope | Exception] = []
        if writes:
            try:
                results = self.store.enqueue_many(
                    [(w.topic, w.qos, w.factory) for w in writes]
                )
            except Exception as exc:  # disk full, store closed: every write of the batch failed
                log.exception("outbox commit failed for %d messages", len(writes))
                results = [exc] * len(writes)
        if logged:
            try:
                self.store.log_parts(logged)
            except Exception:  # statistics only: never worth stopping the writer
                log.exception("part log of %d parts failed", len(logged))
        self._store_reviews([item for item in batch if isinstance(item, _Review)])
        outcome = iter(results)
        for item in batch:
            try:
                if isinstance(item, _Enqueue):
                    result = next(outcome)
                    if item.after is not None:
                        item.after(result)
                    elif isinstance(result, Exception):
                        log.error("message to %s not stored: %s", item.topic, result)
                elif isinstance(item, _Task):
                    item.run()
            except Exception:  # one failing follow-up must not stop the writer
                log.exception("writer follow-up failed")

    def _store_reviews(self, reviews: list[_Review]) -> None:
        items: list[ReviewItem] = []
        for review in reviews:
            try:
                built = review.build()
            except Exception:  # one unencodable image must not cost the others
                log.exception("review item could not be built")
                continue
            if built is not None:
                items.append(built)
        if items:
            error: str | None = None
            try:
                self.store.add_reviews(items)
            except Exception as exc:  # a full or failing disk: the parts are not reviewable
                log.exception("review items of %d parts could not be stored", len(items))
                error = f"{len(items)} parts could not be queued for review: {exc}"
            if self.on_reviews is not None:
                self.on_reviews(error)
