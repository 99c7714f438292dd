"""The fleet controller process: thin I/O around the pure rollout state machine.

- ingest: MQTT messages are parsed and stored in batches (one transaction each); only after the
  commit does the controller publish each station's Receipt, so a crash never drops a message
  a station already deleted from its outbox. A message that cannot be parsed is dropped alone;
  a batch that cannot be stored is dropped unreceipted (its stations send it again), and
  receipts that cannot be sent stay owed: the ingest thread outlives every such failure;
- tick: once a second the active rollout gets a Tick with the fleet as it is and the evidence
  of its current stage; the returned state is persisted BEFORE its commands are sent;
- requests from the HTTP API (start, approve, pause, resume, abort, rollback) are events too;
- disk: every 30 s the free space under data_dir is measured against `min_free_mb`; below it the
  controller warns (log, /api/health, /metrics, dashboard) while there is still room;
- inbox: paho's network thread hands messages to the ingest thread through a bounded `Inbox`;
  when the store falls behind, the network thread waits for room, so a backlog waits in the
  broker's queue for this session and in the stations' outboxes, not in this process's memory.
"""

from __future__ import annotations

import logging
import math
import reprlib
import shutil
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path

from deploy.alignment import Expected, expected_models, out_of_step, realign_plan
from deploy.clock_offset import ClockOffsets
from deploy.config import ControllerConfig
from deploy.fleet_store import (
    FleetStore,
    FleetStoreError,
    SqliteFleetStore,
    StationRecord,
    StreamKey,
)
from deploy.plan import PlanError, RolloutPlan
from deploy.rollout import (
    TERMINAL,
    CandidateSpec,
    CommandAcked,
    Event,
    Phase,
    RolloutState,
    SendCommand,
    StageEvidence,
    StageStep,
    StationView,
    Tick,
    TransitionError,
    restarted,
    start,
    to_status,
    transition,
)
from linesight import protocol as p
from linesight.artifacts import (
    MANIFEST_FILE,
    NAME,
    SEMVER,
    SIGNATURE_FILE,
    BundleError,
    load_public_key,
    parse_manifest,
    sha256_bytes,
    sha256_file,
    verify_bundle,
)
from linesight.command_auth import load_signing_key, sign_command
from linesight.disk_space import MB, is_low, size_text
from linesight.http_server import url_host
from linesight.mqtt import MqttLink, ReceivedMessage

log = logging.getLogger(__name__)
RECEIPT_INTERVAL_S = 0.1
MAX_MESSAGE_BYTES = 1024 * 1024
"""A station message larger than this is dropped unparsed: the largest a station sends is tens
of KB, and JSON of nested empty lists takes about 20 times its size in memory once parsed."""
RECEIPT_RETRY_S = 1.0
"""After a failed receipt flush, the owed receipts are tried again this much later."""
PRUNE_INTERVAL_S = 3600.0
DISK_CHECK_INTERVAL_S = 30.0
"""How often the free space under data_dir is measured against `min_free_mb`."""
ALIGNMENT_CHECK_INTERVAL_S = 10.0
"""How often the stations are checked against their promoted models, for the log."""
DEFAULT_DEFECT_LABEL = "defect"
EVIDENCE_REUSE_S = 2.0
"""How old the stage evidence the tick last weighed may be for the API to show it instead of
asking the store again: the query reads every result of the stage (seconds, an hour into a stage
at a plant's rate), and every open dashboard asks for it every 2 s."""
INBOX_MAX_BYTES = 8 * MB
"""The most the inbox holds, counting each message as its payload, its topic and
INBOX_MESSAGE_OVERHEAD bytes: 7,000 to 11,000 station messages of 0.5 to 1 kB, six or more
batches of the default ingest_batch. A message larger than this alone is taken into an empty
inbox."""
INBOX_MESSAGE_OVERHEAD = 200
"""What a queued message costs in memory besides its payload and topic (its Python objects)."""
INVALID_LOG_EVERY_S = 60.0
"""A station's invalid messages are logged at most this often (see InvalidMessageLog)."""


class RolloutConflict(Exception):
    """A request that cannot be honoured now (another rollout runs, unknown id, ...)."""


class AnyLatest(Enum):
    """A start that does not name the rollout it is meant to follow."""

    ANY = "any"


ANY_LATEST = AnyLatest.ANY


def not_after(latest: str | None, after: str | None) -> str:
    """Why a start meant to follow rollout `after` (None: none) is refused."""
    if latest is None:
        return f"after: no rollout has run on this controller, so none is {after}"
    expected = f"after {after}" if after else "when none had run"
    return (f"rollout {latest} started since: this start was meant to come {expected}. "
            f"It may be this same request, sent before; see 'linesight fleet rollout status', "
            f"and to start another give after: {latest}")


class RolloutNotSaved(Exception):
    """A rollout's new state could not be written to the store: nothing changed (the state is
    saved before anything else happens), so the request can be sent again."""


class UnknownStation(LookupError):
    """No station of that id has reported to this controller."""


class CandidateError(ValueError):
    """A candidate name or version that no model bundle can have."""


MAX_VERSION_LENGTH = 64
"""A version names a folder: a long one would exceed the file system's name limit."""


def check_candidate(name: str, version: str) -> None:
    """Refuse a name or version that is not what a bundle's manifest may hold (the name is
    1 to 64 lower-case letters, digits, '.', '_' or '-'; the version MAJOR.MINOR.PATCH), before
    either becomes part of a path under `bundles`: no '/', no '..', no over-long file name."""
    if not NAME.fullmatch(name):
        raise CandidateError(
            f"candidate name {reprlib.repr(name)}: 1 to 64 lower-case letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    if len(version) > MAX_VERSION_LENGTH or not SEMVER.fullmatch(version):
        raise CandidateError(
            f"candidate version {reprlib.repr(version)}: MAJOR.MINOR.PATCH (such as 2.0.0), "
            f"at most {MAX_VERSION_LENGTH} characters"
        )


class Inbox:
    """The messages paho's network thread hands the ingest thread, at most `max_bytes` of them
    (see INBOX_MAX_BYTES). `put` waits while the inbox is full: the network thread then reads
    no more from the broker, which keeps what follows queued for this session, and the stations
    keep every message in their outboxes until a receipt covers it. `close` ends the waiting:
    every waiting and later `put` drops its message (it earns no receipt, so its station sends
    it again), while `get` hands out what is still inside."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[ReceivedMessage, int]] = deque()
        self._held = 0
        self._putting = 0  # puts waiting for room
        self._closed = False
        self.waits = 0
        """Puts that had to wait for room (each one held the network thread back)."""
        self.dropped = 0
        """Messages refused because the inbox was closed."""
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._items_in = threading.Condition(self._lock)

    @staticmethod
    def cost(message: ReceivedMessage) -> int:
        return len(message.payload) + len(message.topic) + INBOX_MESSAGE_OVERHEAD

    def _fits(self, cost: int) -> bool:
        return not self._items or self._held + cost <= self.max_bytes

    def put(self, message: ReceivedMessage) -> bool:
        """Add `message`, waiting for room if the inbox is full; False (the message dropped)
        once the inbox is closed."""
        cost = self.cost(message)
        with self._lock:
            if not self._closed and not self._fits(cost):
                self.waits += 1
                self._putting += 1
                try:
                    self._room.wait_for(lambda: self._closed or self._fits(cost))
                finally:
                    self._putting -= 1
            if self._closed:
                self.dropped += 1
                return False
            self._items.append((message, cost))
            self._held += cost
            self._items_in.notify()
            return True

    def get(self, timeout: float) -> ReceivedMessage | None:
        """The oldest message, waiting up to `timeout` for one; None if none came (at once
        when the inbox is closed and empty)."""
        with self._lock:
            self._items_in.wait_for(lambda: self._items or self._closed, timeout)
            return self._take()

    def get_nowait(self) -> ReceivedMessage | None:
        with self._lock:
            return self._take()

    def _take(self) -> ReceivedMessage | None:
        if not self._items:
            return None
        message, cost = self._items.popleft()
        self._held -= cost
        if self._putting:
            self._room.notify_all()
        return message

    def close(self) -> None:
        """Take no more: a waiting put and every later one return at once, dropping theirs."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
            self._items_in.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held_bytes(self) -> int:
        return self._held

    def full(self) -> bool:
        """Whether a put is waiting for room now."""
        return self._putting > 0

    def qsize(self) -> int:
        """How many messages wait to be taken (as queue.Queue names it)."""
        return len(self._items)


class InvalidMessageLog:
    """Warns of the invalid messages of each station (as their topic names it) at most once
    every INVALID_LOG_EVERY_S: the first one in full, then how many came since, with the
    latest. A station (or whoever holds its credentials) sending garbage in a loop must neither
    flood the log nor slow down, a log line per message, the ingest of the other stations.
    What is held is logged by the first `flush` due; every ingest and the idle ingest loop
    call it."""

    def __init__(self) -> None:
        self._logged_at: dict[str, float] = {}
        self._held: dict[str, tuple[int, str]] = {}  # station -> (count, the latest's text)

    def add(self, station: str, text: str, now: float) -> None:
        if now - self._logged_at.get(station, -math.inf) < INVALID_LOG_EVERY_S:
            count, _ = self._held.get(station, (0, ""))
            self._held[station] = (count + 1, text)
            return
        self._logged_at[station] = now
        log.warning("dropped an invalid message %s (more from station %s within a minute are "
                    "counted, not logged one by one)", text, station)

    def flush(self, now: float) -> None:
        for station, (count, text) in list(self._held.items()):
            if now - self._logged_at[station] >= INVALID_LOG_EVERY_S:
                del self._held[station]
                self._logged_at[station] = now
                log.warning("dropped %d more invalid messages from station %s since the last "
                            "warning; the latest %s", count, station, text)
        for station in [station for station, at in self._logged_at.items()
                        if now - at >= INVALID_LOG_EVERY_S and station not in self._held]:
            del self._logged_at[station]  # quiet for a minute: its next one is logged at once


@dataclass
class IngestCounters:
    received: int = 0
    stored: int = 0
    invalid: int = 0
    receipts: int = 0
    batches: int = 0
    failed_batches: int = 0
    """Batches that could not be stored (nor receipted): their stations send them again."""
    failed_receipt_flushes: int = 0
    receipts_owed: int = 0
    """Seq streams whose receipt waits to be sent (after a failed flush, until it succeeds)."""
    inbox_bytes: int = 0
    """What waits in the inbox to be stored (as Inbox counts it), at the latest batch."""
    inbox_waits: int = 0
    """Times the network thread waited for room in a full inbox: the store fell behind."""


@dataclass(frozen=True)
class DiskStatus:
    """The free space under data_dir as last measured (None before the first measurement, and
    with a floor of 0, which turns the check off), whether it counts as low, and why the latest
    measurement failed (it then keeps the last one that worked)."""

    free_bytes: int | None = None
    total_bytes: int | None = None
    low: bool = False
    error: str | None = None


def next_disk_status(
    previous: DiskStatus, measured: tuple[int, int] | OSError, floor_bytes: int
) -> DiskStatus:
    """The status after one measurement, (free, total) bytes, or the error it raised."""
    if isinstance(measured, OSError):
        return DiskStatus(previous.free_bytes, previous.total_bytes, previous.low,
                          error=str(measured) or type(measured).__name__)
    free, total = measured
    return DiskStatus(free, total, is_low(free, floor_bytes, was_low=previous.low))


class Controller:
    def __init__(self, config: ControllerConfig, store: FleetStore | None = None) -> None:
        self.config = config
        self.http_port: int | None = None
        """The port the API was bound to, set by whoever serves it (http_port 0: a free one)."""
        self.topics = p.Topics(config.topic_prefix)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store: FleetStore = store or SqliteFleetStore(config.data_dir / "fleet.db")
        self.next_seq = self.store.next_seq  # reserved on disk in blocks: cheap per message
        self.key = load_public_key(config.key) if config.key else None
        self.command_key = load_signing_key(config.command_key) if config.command_key else None
        self.counters = IngestCounters()
        self._invalid_log = InvalidMessageLog()
        self.clock_offsets = ClockOffsets()  # each station's clock against this one's
        self.disk = DiskStatus()
        self.link = MqttLink(config.broker)
        # (since, until) of the link's latest connection, until None while it lasts; None before
        # the first. A station's silence counts only while this controller could hear it.
        self._listening: tuple[datetime, datetime | None] | None = None
        self.link.add_connect_listener(self.link_up)
        self.link.add_disconnect_listener(self.link_down)
        # Set at each connect: the tick thread then publishes what the outage held back.
        self._link_back = threading.Event()
        self._inbox = Inbox(INBOX_MAX_BYTES)
        self._rollout_lock = threading.RLock()
        # The stage evidence last computed: what it was asked for, when (monotonic), and it.
        self._evidence: tuple[tuple[object, ...], float, StageEvidence] | None = None
        self.monotonic: Callable[[], float] = time.monotonic
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.rollout: RolloutState | None = None
        self._listeners: list[Callable[[RolloutState], None]] = []
        self._defect_labels: dict[str, str] = {}  # rollout_id -> its candidate's defect label
        self._expected: dict[str, Expected] | None = None  # read from the store when needed
        self._out_of_step: set[str] = set()  # stations logged as out of step
        self._alignment_lock = threading.Lock()  # one check_alignment at a time
        # The running rollout, else the last one, which can still be shown (and a promotion
        # rolled back) as before the restart.
        found = self.store.active_rollout() or self.store.latest_rollout()
        if found is not None:
            # Pending commands wait anew: acks sent while no controller ran are still to come.
            self.rollout = restarted(RolloutState.model_validate_json(found[1]),
                                     datetime.now(UTC))
            log.info("%s rollout %s (%s, stage %d)",
                     "last" if self.rollout.phase in TERMINAL else "resuming",
                     self.rollout.rollout_id, self.rollout.phase.value, self.rollout.stage)

    # --- life cycle -----------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        """The base URL stations download bundles from: `public_url`, else made of the address
        the API listens on (the port bound, once known: http_port 0 takes a free one)."""
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        port = self.http_port if self.http_port is not None else self.config.http_port
        return f"http://{url_host(self.config.http_host)}:{port}"

    def start(self) -> None:
        for channel in p.Channel:
            if channel in (p.Channel.CMD, p.Channel.RECEIPT):
                continue
            self.link.subscribe(self.topics.every_station(channel), self._receive, qos=1)
        self.check_disk()  # /api/health tells the truth from the first request
        self.link.start()
        for target, name in ((self._ingest_loop, "ingest"), (self._tick_loop, "tick")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Store what the inbox holds, send the receipts it earns, then disconnect. Closing the
        inbox first lets a network thread waiting for room go, so the link can stop."""
        self._stop.set()
        self._inbox.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.link.stop()
        self.store.close()
        if self._inbox.dropped:
            log.info("%d messages that came in while stopping were not stored; their stations "
                     "send them again", self._inbox.dropped)

    def _receive(self, message: ReceivedMessage) -> None:
        """paho's network thread: into the inbox, waiting for room while it is full."""
        self._inbox.put(message)

    # --- ingest -----------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        """Store batches and send the receipts they earn until the controller stops. A failure
        (the database locked or full) is logged and counted, and the loop goes on: a batch that
        was not stored earns no receipt, so its stations send it again; receipts that could not
        be sent stay owed and are tried again."""
        owed: dict[StreamKey, int] = {}  # seq stream -> highest contiguous seq stored
        next_flush = time.monotonic()
        while True:
            batch, stopping = self._next_batch()
            if batch:
                try:
                    owed.update(self.ingest(batch))  # a watermark only rises: the latest wins
                except Exception:  # the controller must keep ingesting  # noqa: BLE001
                    self.counters.failed_batches += 1
                    log.exception("ingest of %d messages failed; nothing of it is receipted, "
                                  "so its stations will send it again", len(batch))
            # Receipts are coalesced: at most one per seq stream per interval, however many
            # batches its messages came in (the highest contiguous seq is all that counts).
            now = time.monotonic()
            if owed and (stopping or now >= next_flush):
                try:
                    self._send_receipts(owed)
                    next_flush = now + RECEIPT_INTERVAL_S
                except Exception:  # noqa: BLE001 - the receipts stay owed
                    self.counters.failed_receipt_flushes += 1
                    next_flush = now + RECEIPT_RETRY_S
                    log.exception("sending receipts failed; %d stay owed and are tried again",
                                  len(owed))
            self.counters.receipts_owed = len(owed)
            self.counters.inbox_bytes = self._inbox.held_bytes
            self.counters.inbox_waits = self._inbox.waits
            if stopping:
                self._invalid_log.flush(math.inf)
                return
            if not batch:
                self._invalid_log.flush(self.monotonic())

    def _next_batch(self) -> tuple[list[ReceivedMessage], bool]:
        """Up to ingest_batch messages (waiting at most a receipt interval for the first), and
        whether the controller is stopping (its inbox closed, and all of it taken)."""
        first = self._inbox.get(timeout=RECEIPT_INTERVAL_S)
        if first is None:
            return [], self._inbox.closed
        batch = [first]
        while len(batch) < self.config.ingest_batch:
            item = self._inbox.get_nowait()
            if item is None:
                break
            batch.append(item)
        return batch, False

    def _send_receipts(self, owed: dict[StreamKey, int]) -> None:
        """Publish the receipt of each owed seq stream and remove it from `owed`; if one fails
        (its seq is reserved with a durable write), it and the rest stay owed."""
        for key, upto_seq in list(owed.items()):
            receipt = p.Receipt(
                station=key.station, seq=self.next_seq(), upto_seq=upto_seq,
                upto_stream=key.stream,
            )
            self.link.publish(self.topics.station(key.station, p.Channel.RECEIPT),
                              receipt.to_json(), qos=1)
            del owed[key]
            self.counters.receipts += 1

    def ingest(self, batch: list[ReceivedMessage]) -> dict[StreamKey, int]:
        """Parse and store one batch; the highest contiguous seq of each seq stream it touched.
        Receipts for them may be sent only after this returns (the batch is committed)."""
        durable: list[p.Envelope] = []
        acks: list[p.CommandAck] = []
        receipted: dict[StreamKey, int] = {}  # what stations say was receipted before
        now = datetime.now(UTC)
        self._invalid_log.flush(self.monotonic())
        for message in batch:
            self.counters.received += 1
            try:
                where = self.topics.parse_station_topic(message.topic)
                if len(message.payload) > MAX_MESSAGE_BYTES:
                    raise ValueError(f"{len(message.payload)} bytes, more than the "
                                     f"{MAX_MESSAGE_BYTES} a station message may have; not read")
                parsed = p.parse_station_message(where.channel, message.payload)
                if parsed.station != where.station:
                    raise p.ProtocolError(type(parsed).__name__, "station",
                                          f"says {parsed.station} on {where.station}'s topic")
            except Exception as exc:  # noqa: BLE001 - whatever one payload raises, only it is lost
                # e.g. a ts whose offset puts it outside the years 1 to 9999 in UTC: OverflowError
                self.counters.invalid += 1
                self._invalid_log.add(
                    self._sender(message.topic),
                    f"on {message.topic[:200]}: {type(exc).__name__}: {exc}", self.monotonic(),
                )
                continue
            if isinstance(parsed, p.StationState):
                # Not a clock sample: a retained state can be any age when it arrives.
                self.store.record_state(parsed, now)
                if parsed.receipted_upto is not None:
                    receipted[StreamKey(parsed.station, parsed.stream)] = parsed.receipted_upto
                continue
            self.clock_offsets.observe(
                parsed.station, (now - parsed.ts).total_seconds(), time.monotonic()
            )
            durable.append(parsed)  # metrics too: the store keeps them beside the seq stream
            if isinstance(parsed, p.CommandAck):
                acks.append(parsed)
        upto: dict[StreamKey, int] = {}
        if durable:
            upto = self.store.ingest(durable)
            self.counters.stored += len(durable)
            self.counters.batches += 1
        for key, receipted_upto in receipted.items():
            moved = self.store.resume(key, receipted_upto)
            if moved is not None:
                upto[key] = max(upto.get(key, -1), moved)
        for ack in acks:
            self.apply(CommandAcked(cmd_id=str(ack.cmd_id), station=ack.station, ok=ack.ok,
                                    error=ack.error), quiet=True)
        return upto

    def _sender(self, topic: str) -> str:
        """The station a topic names, for the log of invalid messages."""
        try:
            return self.topics.parse_station_topic(topic).station[:100]
        except ValueError:
            return topic[:100]

    # --- rollouts ---------------------------------------------------------------------------

    def candidate_spec(self, name: str, version: str) -> tuple[CandidateSpec, str]:
        """The candidate from its verified bundle, and the label its manifest calls a defect.
        CandidateError for a name or version no bundle can have; RolloutConflict for a bundle
        that is refused or cannot be read."""
        check_candidate(name, version)
        bundle = self.config.bundles / name / version
        try:
            manifest = verify_bundle(bundle, self.key)
            manifest_sha256 = sha256_file(bundle / MANIFEST_FILE)
            signature = (bundle / SIGNATURE_FILE).read_text().strip()
        except BundleError as exc:
            raise RolloutConflict(f"bundle {name} {version} refused: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:  # missing, unreadable, not UTF-8 text ...
            raise RolloutConflict(
                f"bundle {name} {version} refused: it cannot be read: {exc}"
            ) from exc
        if (manifest.name, manifest.version) != (name, version):
            # Stations store a bundle by its manifest's name and version, and the dashboard
            # names the rollout by the folder: the two must agree.
            raise RolloutConflict(
                f"bundle {name} {version} refused: its manifest says {manifest.name} "
                f"{manifest.version}"
            )
        spec = CandidateSpec(
            model=p.ModelRef(name=manifest.name, version=manifest.version, sha256=manifest_sha256),
            url=f"{self.public_url}/bundles/{name}/{version}/",
            signature=signature,
        )
        return spec, manifest.defect_label

    def defect_label(self, state: RolloutState) -> str:
        """The label the rollout's candidate calls a defect (its manifest's `defect_label`):
        the escaped-defect gate counts the disagreements whose true label is this one."""
        label = self._defect_labels.get(state.rollout_id)
        if label is None:
            label = self.store.rollout_defect_label(state.rollout_id)
            if label is None:  # a rollout saved before controllers kept the label
                label = self._bundle_defect_label(state.candidate.model)
            self._defect_labels[state.rollout_id] = label
        return label

    def _bundle_defect_label(self, model: p.ModelRef) -> str:
        """The defect label in the candidate's bundle, if its manifest is still the one the
        rollout deployed (same sha256); else the default, with a warning."""
        path = self.config.bundles / model.name / model.version / MANIFEST_FILE
        try:
            data = path.read_bytes()
            if sha256_bytes(data) == model.sha256:
                return parse_manifest(data).defect_label
            problem = "the bundle holds another manifest now"
        except (OSError, BundleError) as exc:
            problem = str(exc)
        log.warning("the defect label of %s %s is unknown (%s): its escaped-defect evidence "
                    "counts %r", model.name, model.version, problem, DEFAULT_DEFECT_LABEL)
        return DEFAULT_DEFECT_LABEL

    def start_rollout(
        self, plan: RolloutPlan, name: str, version: str, *, expect_sha256: str | None = None,
        by: str | None = None, after: str | None | AnyLatest = ANY_LATEST,
    ) -> RolloutState:
        """Start `plan` for bundle `name` `version`, written in its history as started `by`;
        with `expect_sha256`, only if the bundle's manifest still has that sha256; with
        `after`, only if that is still the latest rollout's id (None: none has run), so a
        start sent again cannot start a second rollout (RolloutConflict if not)."""
        if plan.command_timeout_s > self.config.command_ttl_s:
            # A station refuses a command past its expiry: an ack could then never come in time.
            raise PlanError(
                f"command_timeout_s {plan.command_timeout_s:g} is longer than this controller's "
                f"command_ttl_s {self.config.command_ttl_s:g}: a station refuses a command once "
                "it has expired, so make the timeout shorter or the TTL longer"
            )
        spec, defect_label = self.candidate_spec(name, version)
        if expect_sha256 is not None and spec.model.sha256 != expect_sha256:
            raise RolloutConflict(
                f"bundle {name} {version} holds another manifest now (sha256 "
                f"{spec.model.sha256[:12]}..., not {expect_sha256[:12]}...)"
            )
        with self._rollout_lock:
            latest = self.rollout.rollout_id if self.rollout is not None else None
            if after is not ANY_LATEST and latest != after:
                raise RolloutConflict(not_after(latest, after))
            if self.rollout is not None and self.rollout.phase not in TERMINAL:
                raise RolloutConflict(
                    f"rollout {self.rollout.rollout_id} is still {self.rollout.phase.value}"
                )
            now = datetime.now(UTC)
            rollout_id = f"r-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
            state = start(rollout_id, plan, spec, now, by)
            self._defect_labels[rollout_id] = defect_label
            self._commit(state, [], defect_label=defect_label)
            log.info("rollout %s started: %s %s with plan %s%s", rollout_id, name, version,
                     plan.name, f", by {by}" if by else "")
            return state

    def apply(self, event: Event, *, quiet: bool = False, rollout_id: str | None = None) -> None:
        """Feed one event to the current rollout; TransitionError for a request that does not
        apply now (unless quiet, for machine events)."""
        with self._rollout_lock:
            state = self.rollout
            if state is None or (rollout_id is not None and state.rollout_id != rollout_id):
                if quiet:
                    return
                raise RolloutConflict(
                    f"no rollout {rollout_id}" if rollout_id else "no rollout is running"
                )
            try:
                new_state, sends = transition(state, event, datetime.now(UTC))
            except TransitionError:
                if quiet:
                    return
                raise
            if new_state != state or sends:
                self._commit(new_state, sends)

    def _commit(
        self, state: RolloutState, sends: list[SendCommand], *, defect_label: str | None = None
    ) -> None:
        """Persist first, then act: a crash in between only repeats idempotent commands.
        RolloutNotSaved when the store cannot save it: then nothing changed."""
        try:
            self.store.save_rollout(state.rollout_id, state.phase.value,
                                    state.model_dump_json(), state.updated, defect_label)
        except (sqlite3.Error, FleetStoreError) as exc:
            raise RolloutNotSaved(
                f"the rollout's new state could not be saved, so nothing changed: {exc}"
            ) from exc
        previous = self.rollout
        self.rollout = state
        if Phase.PROMOTED in (state.phase, previous.phase if previous else None):
            # A promotion, or one being rolled back, sets what its stations should run.
            self._expected = None
        if self.link.connected:
            self._send(state, sends)
        elif sends:  # nothing waits in paho's memory for the link: republish() sends them
            log.info("broker unreachable: %d commands wait for the link to come back",
                     len(sends))
        self._announced(state, previous)

    def _send(self, state: RolloutState, sends: Sequence[SendCommand]) -> None:
        """Publish `sends` and the rollout's retained status."""
        for send in sends:
            sent = datetime.now(UTC)
            command = p.Command(
                station=send.station, seq=self.next_seq(), cmd_id=uuid.UUID(send.cmd_id),
                body=send.body, rollout_id=send.rollout_id, ts=sent,
                expires_at=sent + timedelta(seconds=self.config.command_ttl_s),
            )
            if self.command_key is not None:
                command = sign_command(command, self.command_key)
            self.link.publish(self.topics.station(send.station, p.Channel.CMD),
                              command.to_json(), qos=1)
            log.info("-> %s %s (%s)", send.station, send.body.name, send.cmd_id[:8])
        status = to_status(state, self.next_seq())
        self.link.publish(self.topics.rollout(), status.to_json(), qos=1, retain=True)

    def _announced(self, state: RolloutState, previous: RolloutState | None) -> None:
        """Log a new phase or stage and tell the listeners."""
        if previous is None or previous.phase != state.phase or previous.stage != state.stage:
            log.info("rollout %s: %s, stage %d (%s)", state.rollout_id, state.phase.value,
                     state.stage, state.reason or state.current.name)
        for listener in self._listeners:
            listener(state)

    def republish(self) -> None:
        """After a reconnect: nothing was published while the link was down, so send every
        command still waiting for its ack again (recorded as a retry, saved first) and the
        rollout's current status. Does nothing while the link is down."""
        with self._rollout_lock:
            state = self.rollout
            if state is None or not self.link.connected:
                return
            again, sends = resent(state, datetime.now(UTC))
            if sends:
                log.info("broker back: %d unacked commands sent again", len(sends))
                self._commit(again, sends)
            else:
                self._send(state, [])

    def add_listener(self, listener: Callable[[RolloutState], None]) -> None:
        self._listeners.append(listener)

    # --- which model each station should run (deploy/alignment.py) --------------------------

    def expected_models(self) -> dict[str, Expected]:
        """Station -> the model its latest promoted rollout made active."""
        found = self._expected
        if found is not None:
            return found
        with self._rollout_lock:  # a rollout being committed may change it
            if self._expected is None:
                states: list[RolloutState] = []
                for state_json in self.store.promoted_rollouts():
                    try:
                        states.append(RolloutState.model_validate_json(state_json))
                    except ValueError as exc:  # pydantic's ValidationError is one
                        log.warning("a promoted rollout cannot be read, so the stations it "
                                    "promoted are not checked against it: %s", exc)
                self._expected = expected_models(states)
            return self._expected

    def alignment(self, record: StationRecord) -> tuple[Expected | None, bool]:
        """The model `record`'s station should run, and whether its latest state names another
        active model (out of step)."""
        expected = self.expected_models().get(record.station)
        rollout = self.rollout
        in_rollout = (rollout is not None and rollout.phase not in TERMINAL
                      and record.station in rollout.touched)
        active = record.state.active if record.state is not None else None
        return expected, out_of_step(expected, active, record.last_seen, in_rollout)

    def check_alignment(self) -> set[str]:
        """The stations out of step now; logs a WARNING when one becomes so, INFO when it is
        back in step."""
        with self._alignment_lock:
            return self._check_alignment()

    def _check_alignment(self) -> set[str]:
        now_out: set[str] = set()
        for record in self.store.stations():
            expected, out = self.alignment(record)
            if not out or expected is None:
                continue
            now_out.add(record.station)
            if record.station not in self._out_of_step:
                active = record.state.active if record.state is not None else None
                runs = f"{active.name} {active.version}" if active else "no model"
                log.warning(
                    "station %s runs %s, but rollout %s promoted %s %s there (restored from a "
                    "backup? replaced?): bring it back with 'linesight fleet realign %s' or "
                    "the dashboard", record.station, runs, expected.rollout_id,
                    expected.model.name, expected.model.version, record.station)
        for station in sorted(self._out_of_step - now_out):
            log.info("station %s is back in step with its promoted model", station)
        self._out_of_step = now_out
        return now_out

    def realign(self, stations: Sequence[str], by: str) -> RolloutState:
        """Start a rollout that deploys and promotes, on `stations` alone and without gates,
        the model their latest promoted rollouts made active there (one model for all of
        them). ValueError for an empty list; UnknownStation; RolloutConflict when a station has
        nothing to be brought back to, is offline or runs that model already, when they were
        promoted to different models, a rollout is running, or the bundle changed since."""
        names = list(dict.fromkeys(stations))
        if not names:
            raise ValueError("name at least one station to realign")
        records = {record.station: record for record in self.store.stations()}
        unknown = [name for name in names if name not in records]
        if unknown:
            raise UnknownStation(f"no station {', '.join(map(repr, unknown))} has reported to "
                                 "this controller")
        expected = self.expected_models()
        now = datetime.now(UTC)
        models: dict[str, list[str]] = {}  # sha256 -> stations
        for name in names:
            found = expected.get(name)
            if found is None:
                raise RolloutConflict(f"no promoted rollout made a model active on {name}: "
                                      "there is nothing to bring it back to")
            state = records[name].state
            active = state.active if state is not None else None
            if active is not None and active.sha256 == found.model.sha256:
                raise RolloutConflict(
                    f"{name} runs {found.model.name} {found.model.version} already")
            if not self.view(records[name], now).online:
                raise RolloutConflict(f"{name} is offline: it can take the model once it is "
                                      "back")
            models.setdefault(found.model.sha256, []).append(name)
        if len(models) > 1:
            groups = "; ".join(
                f"{', '.join(group)}: {expected[group[0]].model.name} "
                f"{expected[group[0]].model.version}" for group in models.values()
            )
            raise RolloutConflict(f"these stations were promoted to different models ({groups}): "
                                  "realign them one model at a time")
        model = expected[names[0]].model
        plan = realign_plan(names, model, min(60.0, self.config.command_ttl_s))
        return self.start_rollout(plan, model.name, model.version, expect_sha256=model.sha256,
                                  by=by)

    # --- the tick ---------------------------------------------------------------------------

    def fleet(self) -> dict[str, StationView]:
        now = datetime.now(UTC)
        return {record.station: self.view(record, now) for record in self.store.stations()}

    def link_up(self, at: datetime | None = None) -> None:
        """The link connected (at `at`, default now): silence counts again from then, and
        the tick thread publishes what the outage held back."""
        self._listening = (at or datetime.now(UTC), None)
        self._link_back.set()

    def link_down(self, at: datetime | None = None) -> None:
        """The link was lost (at `at`, default now): silence stops counting until it is back."""
        listening = self._listening
        if listening is not None and listening[1] is None:
            self._listening = (listening[0], at or datetime.now(UTC))

    def silent_s(self, last_seen: datetime, now: datetime) -> float:
        """How long a station last heard from at `last_seen` has been silent while this
        controller could hear it: not while it was stopped (a restart), nor while its link was
        down, when no station could have reached it."""
        listening = self._listening
        if listening is None:
            return 0.0
        since, until = listening
        return ((until or now) - max(last_seen, since)).total_seconds()

    def view(self, record: StationRecord, now: datetime) -> StationView:
        fresh = (
            record.last_seen is not None
            and self.silent_s(record.last_seen, now) <= self.config.offline_after_s
        )
        state = record.state
        return StationView(
            online=record.online and fresh,
            labels=record.labels,
            faults=len(state.faults) if state else 0,
            fault_codes=tuple(fault.code for fault in state.faults) if state else (),
            active_sha256=state.active.sha256 if state and state.active else None,
            candidate_sha256=state.candidate.sha256 if state and state.candidate else None,
        )

    def tick(self) -> None:
        with self._rollout_lock:
            state = self.rollout
            if state is None or (state.phase in TERMINAL and not state.pending
                                 and not state.stranded):
                return  # a finished rollout is ticked only while a rollback is owed
            evidence = None
            record = state.record
            if record.step == StageStep.OBSERVING and record.observing_since is not None:
                evidence = self.stage_evidence(state)
            self.apply(Tick(self.fleet(), evidence, self.config.command_ttl_s), quiet=True)

    def stage_evidence(self, state: RolloutState, max_age_s: float = 0.0) -> StageEvidence:
        """The paired evidence of `state`'s current stage since it began observing: the one
        computed last when it was for the same stage and is at most `max_age_s` old (the API
        shows what the tick weighed), else asked of the store."""
        record = state.record
        since = record.observing_since or state.updated
        label = self.defect_label(state)
        key = (state.rollout_id, state.stage, tuple(record.stations), since,
               state.candidate.model.sha256, label)
        now = self.monotonic()
        last = self._evidence
        if last is not None and last[0] == key and now - last[1] <= max_age_s:
            return last[2]
        evidence = self.store.paired_evidence(record.stations, since,
                                              state.candidate.model.sha256, label)
        self._evidence = (key, now, evidence)
        return evidence

    def _tick_loop(self) -> None:
        next_prune = time.monotonic()
        next_disk_check = time.monotonic() + DISK_CHECK_INTERVAL_S
        next_alignment_check = time.monotonic()
        while not self._stop.wait(self.config.tick_s):
            if time.monotonic() >= next_disk_check:
                next_disk_check = time.monotonic() + DISK_CHECK_INTERVAL_S
                self.check_disk()
            try:
                self._tick_if_linked()
                if time.monotonic() >= next_alignment_check:
                    next_alignment_check = time.monotonic() + ALIGNMENT_CHECK_INTERVAL_S
                    self.check_alignment()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_INTERVAL_S
                    self.prune()
            except Exception:  # the loop must outlive one bad tick  # noqa: BLE001
                log.exception("rollout tick failed")

    def _tick_if_linked(self) -> None:
        """Tick the rollout only while the link is up, the first tick after a connect
        publishing what the outage held back. While it is down nothing sent could reach a
        station nor an ack come back: a retry, a timeout or a rollback then would be counted
        as sent without being so."""
        if not self.link.connected:
            return
        if self._link_back.is_set():
            self._link_back.clear()
            try:
                self.republish()
            except Exception:
                self._link_back.set()  # tried again at the next tick
                raise
        self.tick()

    def prune(self) -> int:
        before = datetime.now(UTC) - timedelta(days=self.config.retention_days)
        pruned = self.store.prune(before)
        if pruned:
            log.info("pruned %d receipted messages older than %s", pruned, before.isoformat())
        return pruned

    # --- the disk -------------------------------------------------------------------------

    def check_disk(self) -> DiskStatus:
        """Measure the free space under data_dir against `min_free_mb` (nothing with 0) and log
        what changed: a WARNING when it becomes low or cannot be measured, an INFO when that
        ends. Never raises."""
        floor = self.config.min_free_mb * MB
        if floor == 0:
            self.disk = DiskStatus()
            return self.disk
        data_dir = self.config.data_dir
        measured: tuple[int, int] | OSError
        try:
            usage = shutil.disk_usage(data_dir)
            measured = (usage.free, usage.total)
        except OSError as exc:
            measured = exc
        previous = self.disk
        self.disk = current = next_disk_status(previous, measured, floor)
        if current.error is not None and previous.error is None:
            log.warning("cannot measure the free space under %s (%s): the low-disk check "
                        "waits until it can", data_dir, current.error)
        elif current.error is None and previous.error is not None:
            log.info("the free space under %s can be measured again", data_dir)
        if current.free_bytes is None or current.total_bytes is None or current.error:
            return current
        free, total = size_text(current.free_bytes), size_text(current.total_bytes)
        if current.low and not previous.low:
            log.warning("controller disk low: %s free of %s under %s, below the %s floor "
                        "(min_free_mb): lower retention_days or add space; once it is full "
                        "nothing more is stored or receipted", free, total, data_dir,
                        size_text(floor))
        elif previous.low and not current.low:
            log.info("controller disk no longer low: %s free of %s under %s", free, total,
                     data_dir)
        return current


def resent(state: RolloutState, now: datetime) -> tuple[RolloutState, list[SendCommand]]:
    """Every command `state` waits an ack for, sent again at `now`: the state recording it
    (as `_retry` records a retry), and the commands to publish."""
    pending = [command.model_copy(update={"last_sent": now, "attempts": command.attempts + 1})
               for command in state.pending]
    sends = [SendCommand(command.cmd_id, command.station,
                         p.COMMAND_BODY_ADAPTER.validate_python(command.body), state.rollout_id)
             for command in state.pending]
    return state.model_copy(update={"pending": pending}), sends


def bundle_file(bundles: Path, name: str, version: str, file_name: str) -> Path | None:
    """A file of a bundle, only if the path stays inside the bundle folder."""
    root = bundles.resolve()
    path = (bundles / name / version / file_name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path
