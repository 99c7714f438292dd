"""The outbox relay: outbox rows to MQTT, the controller's receipts back into the outbox.

The relay owns the station's delivery guarantee: it publishes every row from the oldest not yet
receipted, deletes rows only when a Receipt for the store's seq stream covers their seq and only
rows it has sent, and publishes everything not yet receipted again after a reconnect, or when
receipts stop advancing for `resend_after_s` (a broker restart can drop the controller's
session); while such resends bring no receipt, each waits twice as long as the one before, up
to `MAX_RESEND_WAIT_S`. A receipt counts what the controller holds under a seq; it says nothing
of a row this relay has not sent yet, which may hold another message under the same seq (a
store restored from a backup gives out seqs again).

By default it runs in its own process (`outbox.relay: process`), with its own MQTT connection
and its own connection to the station's SQLite file: paho's per-message work (publish, PUBACK,
receipts) then never takes the inspection loop's interpreter lock. The agent wakes it after
every commit through a pipe; it also looks every half second. The child exits when its stdin
closes, which happens when the agent exits, even on `kill -9`. `outbox.relay: thread` runs the
same loop inside the agent, on the agent's own MQTT link.

Run as a child: `python -m edge_agent.relay --wake-fd N`, with one line of JSON on stdin (a
`RelaySpec`). It is started by the agent, not by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.store import OutboxRow, StationStore
from linesight import protocol as p
from linesight.logs import setup_logging
from linesight.mqtt import LinkConfig, MqttLink, PublishTicket, ReceivedMessage

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the relay looks at the outbox when nobody wakes it
ACK_WAIT_S = 10.0  # a batch's last PUBACK: not acknowledged by then, the batch goes again
STOP_WAIT_S = 5.0  # a child that has not exited this long after its stdin closed is killed
# Resends that bring no receipt (the controller down, the broker up) wait twice as long each
# time, up to this (or resend_after_s, if longer): the whole outbox goes out again each time.
MAX_RESEND_WAIT_S = 300.0
RECEIPT_WARN_EVERY_S = 60.0  # the least time between two warnings of one kind of ignored receipt


def _held_back_note(held: int) -> str:
    """What a warning adds about those of its kind that were not logged before it."""
    return f"{held} more like it were not logged before this one; " if held else ""


class ReceiptWarnings:
    """Warns of ignored receipts at most once a minute per kind: a peer (or whoever holds its
    credentials) that sends bad receipts in a loop must not flood the station's journal. The
    first of a kind is logged at once; those held back are counted, and the next warning of
    that kind says how many. Per relay, not per process: each relay keeps its own count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counts: dict[str, int] = {}  # every ignored receipt, logged or not, by kind
        self._logged_at: dict[str, float] = {}
        self._held: dict[str, int] = {}  # by kind: not logged since its last warning

    def warn(self, kind: str, message: str, *args: object) -> bool:
        """Count one of `kind`; log `message` unless one of its kind was within a minute."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        if now - self._logged_at.get(kind, -math.inf) < RECEIPT_WARN_EVERY_S:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        self._logged_at[kind] = now
        note = _held_back_note(self._held.pop(kind, 0))
        log.warning(f"{message} ({note}more like it are not logged for a minute)", *args)
        return True


class OutboxRelay:
    """The delivery loop, on any MQTT link: call `run` in its own thread."""

    def __init__(
        self,
        store: StationStore,
        link: MqttLink,
        *,
        station: str,
        topics: p.Topics,
        publish_batch: int,
        resend_after_s: float,
        linger_s: float = 0.0,
        on_acknowledged: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.station = station
        self.publish_batch = publish_batch
        self.resend_after_s = resend_after_s
        self.linger_s = linger_s
        self.receipt_topic = topics.station(station, p.Channel.RECEIPT)
        self._on_acknowledged = on_acknowledged
        self.wake = threading.Event()
        self._replay = threading.Event()
        # Set by the connect listener, which runs after the link reports connected: publishing
        # in between would send a first batch that the replay after the connect sends again.
        self._online = threading.Event()
        self._receipted_upto = -1
        self._receipt_progress = time.monotonic()
        self._resend_wait = resend_after_s  # doubles at each resend, back on a receipt's progress
        # The highest seq this relay has handed to the link (set before the hand-over, which a
        # receipt cannot overtake): it walks the rows in seq order from the oldest, and new rows
        # only get higher seqs, so every row at or below it has been sent.
        self._sent_upto = -1
        self._warned_ahead = False
        self.receipt_warnings = ReceiptWarnings()
        # seq -> the ticket of a copy the link still holds: it goes again by itself at each
        # reconnect until the broker acknowledges it, so the replay does not add another.
        self._in_flight: dict[int, PublishTicket] = {}

    def attach(self) -> None:
        """Subscribe to the receipts and hear of reconnects; call before `link.start()`."""
        self.link.subscribe(self.receipt_topic, self.on_receipt)
        self.link.add_connect_listener(self.on_connected)
        self.link.add_disconnect_listener(self._online.clear)

    def on_connected(self) -> None:
        self._replay.set()
        self._online.set()
        self.wake.set()

    def run(self, keep_going: Callable[[], bool]) -> None:
        """Publish what is pending until `keep_going()` is False."""
        cursor = -1
        while keep_going():
            woken = self.wake.wait(POLL_S)
            if woken and self.linger_s > 0:
                # What the next parts commit meanwhile joins this batch: at a line rate, fewer
                # publish rounds, PUBACK waits and receipts, for `linger_s` more latency.
                time.sleep(self.linger_s)
            self.wake.clear()
            if not (self._online.is_set() and self.link.connected):
                continue
            waiting = time.monotonic() - self._receipt_progress
            stalled = cursor > self._receipted_upto and waiting > self._resend_wait
            if self._replay.is_set() or stalled:
                # After a reconnect, or when receipts stopped coming, everything not yet
                # receipted goes again, with the same msg_id and seq.
                if stalled and not self._replay.is_set():
                    self._resend_wait = min(
                        2 * self._resend_wait, max(self.resend_after_s, MAX_RESEND_WAIT_S)
                    )
                self._replay.clear()
                self._receipt_progress = time.monotonic()
                cursor = -1
            try:
                cursor = self.publish_pending(cursor)
            except Exception:  # a locked or failing disk: the rows stay, try again  # noqa: BLE001
                log.exception("publishing the outbox failed; trying again in %.1f s", POLL_S)
                time.sleep(POLL_S)

    def publish_pending(self, cursor: int) -> int:
        """Publish the rows after `cursor`; return the seq up to which the broker has them."""
        while self.link.connected:
            rows = self.store.pending(limit=self.publish_batch, after_seq=cursor)
            if not rows:
                return cursor
            self._sent_upto = max(self._sent_upto, rows[-1].seq)
            self._forget_released()
            tickets = [self._publish(row) for row in rows]
            if not tickets[-1].wait(ACK_WAIT_S):
                return cursor  # not acknowledged: try again from here
            for row in rows:
                self._in_flight.pop(row.seq, None)
            cursor = rows[-1].seq
        return cursor

    def _forget_released(self) -> None:
        """Forget the copies the link no longer holds (acknowledged since, or dropped)."""
        if self._in_flight:
            self._in_flight = {
                seq: ticket for seq, ticket in self._in_flight.items() if self.link.holds(ticket)
            }

    def _publish(self, row: OutboxRow) -> PublishTicket:
        """Hand `row` to the link, unless a copy of it still waits there for its PUBACK."""
        held = self._in_flight.get(row.seq)
        if held is not None:
            return held
        ticket = self.link.publish(row.topic, row.payload, qos=row.qos)
        if row.qos > 0:
            self._in_flight[row.seq] = ticket
        return ticket

    def on_receipt(self, message: ReceivedMessage) -> None:
        try:
            receipt = p.parse(p.Receipt, message.payload)
        except p.ProtocolError as exc:
            self.receipt_warnings.warn("unreadable", "ignored a receipt: %s", exc)
            return
        if receipt.station != self.station:
            self.receipt_warnings.warn(
                "other station", "ignored a receipt addressed to %s, not %s",
                receipt.station, self.station,
            )  # fmt: skip
            return
        if receipt.upto_stream != self.store.stream:
            # For another store under this station id (this one's storage was replaced, and
            # the broker kept receipts for the old one): its seqs are not this store's.
            self.receipt_warnings.warn(
                "other stream",
                "ignored a receipt for seq stream %s up to %d: this store's stream is %s",
                receipt.upto_stream, receipt.upto_seq, self.store.stream,
            )  # fmt: skip
            return
        last_seq = self.store.last_seq()
        if receipt.upto_seq > last_seq and not self._warned_ahead:
            # The controller holds seqs this store has not given out (yet): it was restored from
            # a backup, and gives out seqs again. The controller keeps both messages of a seq.
            self._warned_ahead = True
            log.warning(
                "a receipt covers seq %d, but this store has given out seqs up to %d only: was "
                "station.db restored from a backup? Nothing is lost: rows are deleted only once "
                "sent", receipt.upto_seq, last_seq,
            )  # fmt: skip
        upto = min(receipt.upto_seq, self._sent_upto)
        try:
            deleted = self.store.acknowledge(upto)
        except sqlite3.Error as exc:
            # Not taken for receipted: the rows go again after resend_after_s, and the answer
            # to them deletes them (on an idle line no other receipt would come).
            log.warning("a receipt up to seq %d could not be applied (%s): its rows stay and "
                        "go again", upto, exc)
            return
        if upto > self._receipted_upto:
            self._receipted_upto = upto
            self._receipt_progress = time.monotonic()
            self._resend_wait = self.resend_after_s
        if deleted and self._on_acknowledged is not None:
            self._on_acknowledged(upto)


@dataclass
class Restarts:
    """When to start a relay that died: at once the first time, then 1, 2, 4 ... up to 30 s
    after the previous start while it keeps dying (a relay that cannot run must not cost a
    Python start-up every second); a relay that has run `healthy_after_s` resets the delay."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    healthy_after_s: float = 10.0
    delay_s: float = 0.0
    next_start: float = 0.0
    started_at: float | None = None

    def may_start(self, now: float) -> bool:
        return now >= self.next_start

    def started(self, now: float) -> None:
        self.started_at = now
        self.delay_s = min(max(2 * self.delay_s, self.first_delay_s), self.max_delay_s)
        self.next_start = now + self.delay_s

    def healthy(self, now: float) -> bool:
        """True once the relay started last has run long enough (its fault may clear)."""
        if self.started_at is None or now - self.started_at < self.healthy_after_s:
            return False
        self.started_at = None
        self.delay_s = 0.0
        return True


class ThreadRelay:
    """`outbox.relay: thread`: the loop on a thread of the agent, on the agent's own link."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.starts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self) -> None:
        self.relay.attach()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self.relay.run, args=(lambda: not self._stopping.is_set(),),
            name=f"relay-{self.relay.station}", daemon=True,
        )
        self._thread.start()
        self.starts += 1

    def wake(self) -> None:
        self.relay.wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def exit_code(self) -> int | None:
        return None

    def stop(self) -> None:
        self._stopping.set()
        self.relay.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)


# --- the relay in its own process ---------------------------------------------------------------


class RelaySpec(BaseModel):
    """What the agent hands its relay child on stdin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    station: str = Field(min_length=1)
    topic_prefix: str = Field(min_length=1)
    data_dir: Path
    max_outbox_rows: int = Field(ge=1)
    publish_batch: int = Field(ge=1)
    resend_after_s: float = Field(gt=0)
    linger_s: float = Field(default=0.0, ge=0, le=1)
    broker: LinkConfig
    log_level: str = "INFO"


def relay_link_config(broker: LinkConfig) -> LinkConfig:
    """The relay's own MQTT identity: the station's client id with `-outbox` (a second client
    with the same id would take the agent's session over)."""
    suffix = "-outbox"
    client_id = broker.client_id[: 128 - len(suffix)] + suffix
    return broker.model_copy(update={"client_id": client_id})


class RelayProcess:
    """The agent's handle on its relay child: start, wake, supervise, stop."""

    def __init__(self, spec: RelaySpec) -> None:
        self.spec = spec
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._wake_w: int | None = None
        # Writers wake the child while housekeeping may restart it: a closed descriptor's
        # number is soon reused by some other file, which a late wake-up must never write to.
        self._wake_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def attach(self) -> None:
        """Nothing to do on the agent's link: the child has its own."""

    def start(self) -> None:
        """Start the child (again, after it died: the outbox is the hand-over)."""
        self.stop()  # a previous child: reaped, its pipes closed
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        try:
            self._process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "edge_agent.relay", "--wake-fd", str(wake_r)],
                stdin=subprocess.PIPE,
                pass_fds=(wake_r,),
                # Its own session: a Ctrl-C at the terminal reaches the agent, which stops and
                # delivers what is owed; the relay must still be there for that.
                start_new_session=True,
            )
        except OSError:
            os.close(wake_w)
            raise
        finally:
            os.close(wake_r)
        with self._wake_lock:
            self._wake_w = wake_w
        stdin = self._process.stdin
        if stdin is None:  # cannot happen with stdin=PIPE; keeps the type checker honest
            raise RuntimeError("the outbox relay has no stdin")
        # A child that died at once closed its end: the supervisor sees it dead and retries.
        with contextlib.suppress(BrokenPipeError):
            stdin.write(self.spec.model_dump_json().encode() + b"\n")
            stdin.flush()
        self.starts += 1

    def wake(self) -> None:
        """Tell the child there is something to publish; never blocks."""
        with self._wake_lock:
            if self._wake_w is None:
                return
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_w, b"\0")  # a full pipe already holds a wake-up

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How the current child ended (negative: the signal that killed it); None if running."""
        return self._process.poll() if self._process is not None else None

    def stop(self) -> None:
        """Close the child's stdin (its signal to stop) and wait; kill it if it hangs."""
        process, self._process = self._process, None
        self._close_wake()
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("outbox relay (pid %d) did not stop; killing it", process.pid)
            process.kill()
            process.wait(timeout=STOP_WAIT_S)

    def _close_wake(self) -> None:
        with self._wake_lock:
            if self._wake_w is not None:
                os.close(self._wake_w)
                self._wake_w = None


def _read_spec(line: bytes) -> RelaySpec:
    try:
        return RelaySpec.model_validate_json(line)
    except ValidationError as exc:
        raise SystemExit(f"outbox relay: invalid spec on stdin: {exc}") from exc


def _forward_wakes(fd: int, wake: threading.Event) -> None:
    while True:
        try:
            data = os.read(fd, 512)
        except OSError:
            return
        if not data:
            return
        wake.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="the station's outbox relay (started by the agent, not by hand)"
    )
    parser.add_argument("--wake-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # The agent decides when the relay stops (by closing stdin): a terminal's Ctrl-C or a
    # service manager's SIGTERM to the whole group must not cut delivery short before that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec = _read_spec(sys.stdin.buffer.readline())
    setup_logging(f"relay[{spec.station}]", spec.log_level)
    store = StationStore(spec.data_dir, max_outbox_rows=spec.max_outbox_rows)
    link = MqttLink(relay_link_config(spec.broker))
    relay = OutboxRelay(
        store, link, station=spec.station, topics=p.Topics(spec.topic_prefix),
        publish_batch=spec.publish_batch, resend_after_s=spec.resend_after_s,
        linger_s=spec.linger_s,
    )
    stopping = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the agent closed it, or died
        stopping.set()
        relay.wake.set()

    relay.attach()
    link.start()
    threading.Thread(target=watch_stdin, name="relay-stdin", daemon=True).start()
    threading.Thread(
        target=_forward_wakes, args=(args.wake_fd, relay.wake), name="relay-wakes", daemon=True
    ).start()
    try:
        relay.run(lambda: not stopping.is_set())
    finally:
        link.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
