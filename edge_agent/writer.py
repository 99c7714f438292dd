"""Group commit for the station's outbox.

An fsync costs milliseconds on a line-side SSD, far more than the models' inference, so one
commit per message would make the disk, not the models, set the line's pace. The inspection
loop hands its messages to this writer and goes on with the next part; the writer commits
everything waiting in ONE transaction (synchronous=FULL), and only then runs what must follow a
durable record: the outbox relay's wake-up (once per batch), the reject gate, review images, the
part log. A message is therefore never acted on or published before it is on disk. Review items
of a batch are stored together too (one commit for their rows, one directory sync for their
images).

The queue has a bound (`max_backlog`, `storage.write_queue`): a disk that hangs (a stuck NFS or
USB disk, an fsync that takes minutes) must not make it grow until the process runs out of
memory and loses all of it. The writer never refuses an item (each one is a part already
decided); the producer asks `wait_for_room` before taking the next part.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.store import PartLogEntry, ReviewItem, StationStore
from linesight.protocol import Envelope

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 600
"""Items waiting for the disk (about three per part) before the next part waits for room."""
# Another process holds station.db's write lock (each try waits SQLite's busy timeout first).
_LOCKED = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_LOCKED_RETRY_S = 0.1  # between two tries, should SQLite give up without waiting

After = Callable[[Envelope | Exception], None]


@dataclass(frozen=True, slots=True)
class _Enqueue:
    topic: str
    qos: int
    factory: Callable[[int], Envelope]
    after: After | None


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


class DurableWriter:
    def __init__(
        self,
        store: StationStore,
        *,
        max_batch: int = 256,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        name: str = "writer",
        on_reviews: Callable[[str | None], None] | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        """`on_reviews` hears after each batch of review items: None, or what went wrong;
        `on_committed` once after each commit that stored at least one message. `max_backlog`
        is the number of items waiting above which `wait_for_room` waits."""
        if max_backlog < 1:
            raise ValueError(f"max_backlog: must be at least 1, got {max_backlog}")
        self.store = store
        self.on_reviews = on_reviews
        self.on_committed = on_committed
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self._room = threading.Condition()  # notified as each batch leaves the queue
        # SimpleQueue: a C queue, a tenth of queue.Queue's cost per item (several per part).
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def enqueue(
        self, topic: str, qos: int, factory: Callable[[int], Envelope], after: After | None = None
    ) -> None:
        """Store a message in the outbox soon; `after` gets the stored message (or the error)."""
        self._queue.put(_Enqueue(topic, qos, factory, after))

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
        """Items waiting for the writer thread (a batch in its hands no longer counts)."""
        return self._queue.qsize()

    @property
    def full(self) -> bool:
        return self._queue.qsize() >= self.max_backlog

    def wait_for_room(self, timeout: float) -> bool:
        """Wait up to `timeout` s until fewer than `max_backlog` items wait; whether they do."""
        with self._room:
            return self._room.wait_for(lambda: not self.full, timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._room:  # the batch has left the queue: room for the next part
                self._room.notify_all()
            self._process([item for item in batch if item is not None])
            if None in batch:
                return

    def _process(self, batch: list[_Item]) -> None:
        writes = [item for item in batch if isinstance(item, _Enqueue)]
        logged = [item.entry for item in batch if isinstance(item, _PartLog)]
        results: list[Envelope | Exception] = []
        if writes:
            try:
                results = self._commit(writes, logged)
                logged = []  # stored in the same commit
            except Exception as exc:  # disk full, store closed: every write of the batch failed
                log.exception("outbox commit failed for %d messages", len(writes))
                results = [exc] * len(writes)
        if logged:
            try:
                self.store.log_parts(logged)
            except Exception:  # statistics only: never worth stopping the writer
                log.exception("part log of %d parts failed", len(logged))
        # What must follow a stored message first (the relay's wake-up, the reject gate), then
        # the review images (JPEG and fsyncs: slow), then tasks, which may wait for all of it.
        if self.on_committed is not None and any(
            not isinstance(result, Exception) for result in results
        ):
            try:
                self.on_committed()
            except Exception:  # the relay also looks on its own every half second
                log.exception("writer commit follow-up failed")
        for write, result in zip(writes, results, strict=True):
            try:
                if write.after is not None:
                    write.after(result)
                elif isinstance(result, Exception):
                    log.error("message to %s not stored: %s", write.topic, result)
            except Exception:  # one failing follow-up must not stop the writer
                log.exception("writer follow-up failed")
        self._store_reviews([item for item in batch if isinstance(item, _Review)])
        for item in batch:
            if isinstance(item, _Task):
                try:
                    item.run()
                except Exception:  # one failing task must not stop the writer
                    log.exception("writer task failed")

    def _commit(
        self, writes: list[_Enqueue], logged: list[PartLogEntry]
    ) -> list[Envelope | Exception]:
        """The batch's one commit; a file locked by another process is waited out like a disk
        that hangs (the queue's bound stops the line meanwhile): its messages are never dropped."""
        items = [(w.topic, w.qos, w.factory) for w in writes]
        waited = 0
        while True:
            try:
                results = self.store.enqueue_many(items, part_log=logged)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode not in _LOCKED:
                    raise
                waited += 1
                if waited == 1:
                    log.warning("%s is locked by another process (%s): %d messages wait for it",
                                self.store.path, exc, len(writes))
                time.sleep(_LOCKED_RETRY_S)
                continue
            if waited:
                log.warning("%s free again after %d tries: the %d messages are stored",
                            self.store.path, waited + 1, len(writes))
            return results

    def _store_reviews(self, reviews: list[_Review]) -> None:
        items: list[ReviewItem] = []
        errors: list[str] = []
        unbuilt: list[Exception] = []
        for review in reviews:
            try:
                built = review.build()
            except Exception as exc:  # one unencodable image must not cost the others
                log.exception("review item could not be built")
                unbuilt.append(exc)
                continue
            if built is not None:
                items.append(built)
        if unbuilt:
            # Held for review, yet not in the queue: said, not only logged.
            errors.append(f"{len(unbuilt)} parts could not be queued for review: {unbuilt[0]}")
        if items:
            try:
                inserted = self.store.add_reviews(items)
            except Exception as exc:  # a full or failing disk: the parts are not reviewable
                log.exception("review items of %d parts could not be stored", len(items))
                errors.append(f"{len(items)} parts could not be queued for review: {exc}")
            else:
                repeated = [item.part_id for item, new in zip(items, inserted, strict=True)
                            if not new]
                if repeated:
                    # The queue holds one item per part id: a source (or a PLC's trigger)
                    # that hands out an id again would otherwise lose the part silently.
                    error = (f"{len(repeated)} parts not queued for review: part id already "
                             f"in the review queue (the source repeats ids): {repeated[0]}")
                    log.error("%s", error)
                    errors.append(error)
        if (items or unbuilt) and self.on_reviews is not None:
            self.on_reviews("; ".join(errors) or None)
