"""The controller's ingest against a model: stations' messages arrive out of order, twice, with
gaps, across a station whose storage is replaced (a new seq stream, decision 0009), a station
that restarts and sends again everything not yet receipted, controller restarts, a lost store
and a store restored from a backup. Each message is stored once; a Receipt never covers a seq
the controller does not hold (the station would delete a message nobody has), never goes back,
and reaches the last seq once the gaps are filled (docs/decisions/0005-fleet-store.md,
0009-seq-streams.md).

A second machine runs the real station outboxes, the relay's receipt handling and the real
controller store together: a message given a seq is in its station's outbox or in the
controller's store, unless the disk that held it was lost."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from deploy.fleet_store import SqliteFleetStore, StreamKey
from edge_agent.relay import OutboxRelay
from edge_agent.store import DB_FILE, StationStore
from linesight import protocol as p
from linesight.mqtt import MqttLink, ReceivedMessage

REF = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="1.1.0", sha256="c" * 64)
STATIONS = ("st-a", "st-b")
TOPICS = p.Topics()
KINDS = st.sampled_from(("decision", "shadow", "ack"))

Key = tuple[str, uuid.UUID | None, int]
"""(station, stream, seq): one durable message."""
Stream = tuple[str, uuid.UUID | None]


def build(kind: str, station: str, stream: uuid.UUID | None, seq: int) -> p.Envelope:
    part_id = f"{station}-{stream}-{seq}"
    if kind == "decision":
        return p.Decision(
            station=station, seq=seq, stream=stream, part_id=part_id,
            decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
            model=REF, latency_ms=1.0, automation=p.AutomationLevel.FULL,
            mode=p.DeploymentMode.SHADOW,
        )  # fmt: skip
    if kind == "shadow":
        return p.ShadowResult(
            station=station, seq=seq, stream=stream, part_id=part_id,
            mode=p.DeploymentMode.SHADOW,
            active=p.ModelOpinion(model=REF, label="ok", latency_ms=1.0),
            candidate=p.ModelOpinion(model=CANDIDATE, label="ok", latency_ms=2.0), agree=True,
        )  # fmt: skip
    return p.CommandAck(
        station=station, seq=seq, stream=stream, cmd_id=uuid.uuid4(), command="ping", ok=True
    )


@dataclass
class Station:
    """A station as the controller sees it: its current seq stream, the next seq it gives
    out, and the highest receipt it applied (it deleted everything up to there)."""

    name: str
    stream: uuid.UUID | None
    next_seq: int = 0
    receipted: int = -1


@dataclass
class Controller:
    """What the controller's store must hold: every key stored and the msg_id of its first
    message, the other messages stored beside it under the same key (a station that gave out
    the seq again), the keys pruned since, the floor a station's `receipted_upto` set per
    stream, and the highest receipt given per stream (which must never go back)."""

    stored: dict[Key, str] = field(default_factory=dict)
    beside: set[tuple[str, uuid.UUID | None, int, str]] = field(default_factory=set)
    pruned: set[Key] = field(default_factory=set)
    floor: dict[Stream, int] = field(default_factory=dict)
    receipts: dict[Stream, int] = field(default_factory=dict)

    def copy(self) -> Controller:
        return Controller(
            dict(self.stored), set(self.beside), set(self.pruned), dict(self.floor),
            dict(self.receipts),
        )  # fmt: skip

    def watermark(self, stream: Stream) -> int:
        """The end of the run of stored seqs from the stream's floor (-1 when none)."""
        mark = self.floor.get(stream, -1)
        while (*stream, mark + 1) in self.stored:
            mark += 1
        return mark

    def streams(self) -> set[Stream]:
        return {(station, stream) for station, stream, _ in self.stored} | self.floor.keys()


def _stream_text(stream: uuid.UUID | None) -> str:
    return "" if stream is None else str(stream)


class FleetIngestModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="fleet-model-"))
        self.path = self.folder / "fleet.db"
        self.backup_path = self.folder / "backup.db"
        self.fleet: SqliteFleetStore | None = None
        self.stations: dict[str, Station] = {}
        self.sent: dict[Key, p.Envelope] = {}
        self.model = Controller()
        self.backup: Controller | None = None

    def teardown(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def store(self) -> SqliteFleetStore:
        assert self.fleet is not None
        return self.fleet

    @initialize(legacy=st.booleans())
    def start(self, legacy: bool) -> None:
        """Two stations; the first may run a store from before seq streams (no stream)."""
        self.fleet = SqliteFleetStore(self.path)
        for name in STATIONS:
            unnamed = legacy and name == STATIONS[0]
            self.stations[name] = Station(name, None if unnamed else uuid.uuid4())

    # -- stations --

    @rule(station=st.sampled_from(STATIONS), kinds=st.lists(KINDS, min_size=1, max_size=4))
    def station_enqueues(self, station: str, kinds: list[str]) -> None:
        """Messages are numbered on the station; none has reached the controller yet."""
        at = self.stations[station]
        for kind in kinds:
            self.sent[(station, at.stream, at.next_seq)] = build(
                kind, station, at.stream, at.next_seq
            )
            at.next_seq += 1

    @rule(station=st.sampled_from(STATIONS))
    def station_storage_is_replaced(self, station: str) -> None:
        """A new disk: a new seq stream from 0. What the old disk held is still in flight."""
        self.stations[station] = Station(station, uuid.uuid4())

    def _apply_receipts(self, receipts: dict[StreamKey, int]) -> None:
        """Each station applies a receipt for its own store's stream and deletes up to it:
        every seq it deletes is held by the controller, or was receipted by a store it lost
        (below the floor the station's own report set)."""
        for key, upto in receipts.items():
            at = self.stations[key.station]
            if key.stream != at.stream:
                continue  # the relay ignores a receipt for another store's stream
            stream = (key.station, key.stream)
            floor = self.model.floor.get(stream, -1)
            for seq in range(max(floor, at.receipted) + 1, upto + 1):
                assert (*stream, seq) in self.model.stored, f"{stream} seq {seq} would be lost"
            assert upto < at.next_seq, "a receipt for a seq the station never gave out"
            at.receipted = max(at.receipted, upto)

    def _ingest(self, batch: list[p.Envelope]) -> dict[StreamKey, int]:
        before = {stream: self.model.watermark(stream) for stream in self.model.streams()}
        durable = [message for message in batch if not isinstance(message, p.StationMetrics)]
        for message in durable:
            key = (message.station, message.stream, message.seq)
            msg_id = str(message.msg_id)
            at_or_below = message.seq <= before.get(key[:2], -1)
            if key in self.model.stored and key not in self.model.pruned:
                if self.model.stored[key] != msg_id:
                    self.model.beside.add((*key, msg_id))
            elif key not in self.model.stored and not at_or_below:
                self.model.stored[key] = msg_id
        receipts = self.store.ingest(batch)
        touched = {(message.station, message.stream) for message in durable}
        assert set(receipts) == {StreamKey(*stream) for stream in touched}
        for name, upto in receipts.items():
            stream = (name.station, name.stream)
            assert upto == self.model.watermark(stream), (name, upto)
            assert upto >= self.model.receipts.get(stream, -1), "a receipt went back"
            self.model.receipts[stream] = upto
        return receipts

    @rule(
        data=st.data(),
        receipts_arrive=st.booleans(),
        reused=st.booleans(),
        with_metrics=st.booleans(),
    )
    def messages_arrive(
        self, data: st.DataObject, receipts_arrive: bool, reused: bool, with_metrics: bool
    ) -> None:
        """Any of the messages ever sent, old streams too, in any order, repeated; sometimes
        with another message under one's seq (a station restored from a backup gives out seqs
        again), which is stored beside it, or a metrics report beside them,
        which earns no receipt (an empty or metrics-only batch earns none at all)."""
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.sent, key=repr)), max_size=8)
            if self.sent
            else st.just([]),
            label="arrival",
        )
        batch = [self.sent[key] for key in keys]
        if reused and batch:
            index = data.draw(st.integers(0, len(batch) - 1), label="re-used seq at")
            batch[index] = batch[index].model_copy(update={"msg_id": uuid.uuid4()})
        if with_metrics:
            batch.append(p.StationMetrics(station=STATIONS[0], seq=0, window_s=5.0, parts=1))
        receipts = self._ingest(batch)
        if receipts_arrive:
            self._apply_receipts(receipts)

    @rule(station=st.sampled_from(STATIONS))
    def station_reports_what_was_receipted(self, station: str) -> None:
        """Its state's `receipted_upto`: a controller that lost what it had receipted
        continues from there instead of waiting for ever."""
        at = self.stations[station]
        stream = (station, at.stream)
        mark = self.model.watermark(stream)
        moved = self.store.resume(StreamKey(*stream), at.receipted)
        if at.receipted > mark:
            self.model.floor[stream] = at.receipted
            assert moved == self.model.watermark(stream)
            self.model.receipts[stream] = max(self.model.receipts.get(stream, -1), moved)
        else:
            assert moved is None

    @rule(station=st.sampled_from(STATIONS), state_first=st.booleans())
    def station_delivers_everything_it_owes(self, station: str, state_first: bool) -> None:
        """Everything not yet receipted, in order, with its state before or after: its receipt
        then reaches its last seq, whatever the controller lost or holds."""
        if state_first:
            self.station_reports_what_was_receipted(station)
        at = self.stations[station]
        owed = [
            self.sent[(station, at.stream, seq)] for seq in range(at.receipted + 1, at.next_seq)
        ]
        if owed:
            self._apply_receipts(self._ingest(owed))
        if not state_first:
            self.station_reports_what_was_receipted(station)
        assert self.store.contiguous(station, at.stream) == at.next_seq - 1

    # -- the controller --

    @rule()
    def controller_restarts(self) -> None:
        self.store.close()
        self.fleet = SqliteFleetStore(self.path)

    @rule()
    def controller_prunes(self) -> None:
        """Retention deletes only what is at or below its stream's watermark."""
        due = {
            key for key in self.model.stored.keys() - self.model.pruned
            if key[2] <= self.model.watermark(key[:2])
        }  # fmt: skip
        beside = {other for other in self.model.beside if other[:3] in due}
        assert self.store.prune(datetime.now(UTC) + timedelta(days=1)) == len(due) + len(beside)
        self.model.pruned |= due
        self.model.beside -= beside

    @rule()
    def controller_store_is_backed_up(self) -> None:
        source = sqlite3.connect(self.path)
        target = sqlite3.connect(self.backup_path)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        self.backup = self.model.copy()

    @rule(restore=st.booleans())
    def controller_loses_its_store(self, restore: bool) -> None:
        """The store is replaced by an empty one, or by the last backup: it lacks messages it
        receipted, which the stations deleted and never send again."""
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        if restore and self.backup is not None:
            shutil.copyfile(self.backup_path, self.path)
            self.model = self.backup.copy()
        else:
            self.model = Controller()
        self.fleet = SqliteFleetStore(self.path)

    # -- what must hold after every step --

    @invariant()
    def every_message_is_stored_once_under_its_key(self) -> None:
        if self.fleet is None:
            return
        reader = sqlite3.connect(self.path)
        try:
            rows = reader.execute("SELECT station, stream, seq, msg_id FROM messages").fetchall()
        finally:
            reader.close()
        assert len({msg_id for *_, msg_id in rows}) == len(rows), "a msg_id stored twice"
        expected = {
            (station, _stream_text(stream), seq, msg_id)
            for (station, stream, seq), msg_id in self.model.stored.items()
            if (station, stream, seq) not in self.model.pruned
        } | {
            (station, _stream_text(stream), seq, msg_id)
            for station, stream, seq, msg_id in self.model.beside
        }
        assert set(rows) == expected

    @invariant()
    def receipts_cover_only_what_is_held_and_reach_the_end_of_each_run(self) -> None:
        if self.fleet is None:
            return
        for stream in self.model.streams() | {(s.name, s.stream) for s in self.stations.values()}:
            mark = self.store.contiguous(*stream)
            floor = self.model.floor.get(stream, -1)
            # Below the floor the station said it deleted them on an earlier receipt; above it,
            # every seq a receipt covers is in this store.
            held = [(*stream, seq) in self.model.stored for seq in range(floor + 1, mark + 1)]
            assert all(held), f"{stream} receipted up to {mark} over a seq it does not hold"
            assert mark == self.model.watermark(stream)



class Ticket:
    def wait(self, timeout: float) -> bool:
        return True


@dataclass
class Broker:
    """What a station's relay published and the controller has not been handed yet: the
    broker's queue towards the controller's persistent session (QoS 1: it keeps them)."""

    queue: list[bytes] = field(default_factory=list)
    connected: bool = True

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> Ticket:
        self.queue.append(payload)
        return Ticket()


@dataclass
class Line:
    """A station on the line: its store (real, on its own data dir), the relay's publishing and
    receipt handling on it, and a backup of its data dir if one was taken."""

    name: str
    data_dir: Path
    store: StationStore
    relay: OutboxRelay
    backup: Path | None = None
    cursor: int = -1  # the relay's: published up to here since it started or replayed


class StationsToControllerModel(RuleBasedStateMachine):
    """The real station outboxes and the real controller store together, with the relay's own
    publishing and receipt handling in between and a broker that keeps what was published: a
    message given a seq is in its station's outbox, in the broker or in the controller's store,
    unless the disk that held it was lost. Also when a station's store is restored from a
    backup and gives out seqs again for other messages."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="line-model-"))
        self.path = self.folder / "fleet.db"
        self.fleet: SqliteFleetStore | None = None
        self.line: dict[str, Line] = {}
        self.broker: dict[str, Broker] = {name: Broker() for name in STATIONS}
        self.given: dict[str, tuple[str, str, int]] = {}  # msg_id -> (station, stream, seq)
        self.lost: set[str] = set()  # msg_ids lost with a disk, not by the protocol
        self.receipts: list[p.Receipt] = []  # every receipt sent: the broker may keep any
        self.disks = 0
        self.restored = False
        self.controller_replaced = False

    def teardown(self) -> None:
        for at in self.line.values():
            at.store.close()
        if self.fleet is not None:
            self.fleet.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def store(self) -> SqliteFleetStore:
        assert self.fleet is not None
        return self.fleet

    def _open(self, name: str, data_dir: Path, backup: Path | None = None) -> None:
        store = StationStore(data_dir)
        relay = OutboxRelay(
            store, cast(MqttLink, self.broker[name]), station=name, topics=TOPICS,
            publish_batch=3, resend_after_s=1.0,
        )  # fmt: skip
        self.line[name] = Line(name, data_dir, store, relay, backup)

    def _new_disk(self, name: str) -> None:
        self.disks += 1
        self._open(name, self.folder / f"{name}-disk-{self.disks}")

    @initialize()
    def start(self) -> None:
        self.fleet = SqliteFleetStore(self.path)
        for name in STATIONS:
            self._new_disk(name)

    def _receipt(self, name: str, key: StreamKey, upto: int) -> None:
        """The controller's receipt reaches the station's relay, as an MQTT message would."""
        receipt = p.Receipt(station=key.station, seq=0, upto_seq=upto, upto_stream=key.stream)
        self.receipts.append(receipt)
        self._deliver_receipt(name, receipt)

    def _deliver_receipt(self, name: str, receipt: p.Receipt) -> None:
        at = self.line[name]
        at.relay.on_receipt(
            ReceivedMessage(topic=at.relay.receipt_topic, payload=receipt.to_json(), qos=1,
                            retain=False)
        )  # fmt: skip

    def _ingest(self, payloads: list[bytes], receipts_arrive: bool) -> None:
        receipts = self.store.ingest([p.parse(p.Decision, payload) for payload in payloads])
        if receipts_arrive:
            for key, upto in receipts.items():
                self._receipt(key.station, key, upto)

    def _pending(self, at: Line) -> set[str]:
        return {row.msg_id for row in at.store.pending(limit=10_000)}

    @rule(station=st.sampled_from(STATIONS), parts=st.integers(1, 4))
    def station_decides(self, station: str, parts: int) -> None:
        at = self.line[station]
        for _ in range(parts):
            message = at.store.enqueue(
                TOPICS.station(station, p.Channel.DECISION), 1,
                lambda seq: build("decision", station, at.store.stream, seq),
            )  # fmt: skip
            self.given[str(message.msg_id)] = (
                station, _stream_text(message.stream), message.seq
            )

    @rule(station=st.sampled_from(STATIONS), replay=st.booleans())
    def relay_publishes(self, station: str, replay: bool) -> None:
        """What is pending after the relay's cursor, or everything again (a reconnect)."""
        at = self.line[station]
        at.cursor = at.relay.publish_pending(-1 if replay else at.cursor)

    @rule(
        station=st.sampled_from(STATIONS), data=st.data(), receipts_arrive=st.booleans(),
        delivered=st.booleans(),
    )  # fmt: skip
    def the_broker_hands_messages_to_the_controller(
        self, station: str, data: st.DataObject, receipts_arrive: bool, delivered: bool
    ) -> None:
        """Any of what the broker holds, in any order; handed over for good, or kept to come
        again (the controller's session resumed before its PUBACKs)."""
        queue = self.broker[station].queue
        if not queue:
            return
        picked = data.draw(
            st.lists(st.integers(0, len(queue) - 1), max_size=8), label="arrival"
        )
        payloads = [queue[index] for index in picked]
        if delivered:
            for index in sorted(set(picked), reverse=True):
                del queue[index]
        self._ingest(payloads, receipts_arrive)

    @rule(station=st.sampled_from(STATIONS), data=st.data())
    def the_broker_redelivers_old_receipts(self, station: str, data: st.DataObject) -> None:
        """Receipts the broker kept, in any order: for this store, for an earlier one (its
        storage was replaced), or behind."""
        mine = [receipt for receipt in self.receipts if receipt.station == station]
        for receipt in data.draw(st.permutations(mine), label="receipts"):
            self._deliver_receipt(station, receipt)

    @rule(station=st.sampled_from(STATIONS), receipts_arrive=st.booleans())
    def station_reports_its_state(self, station: str, receipts_arrive: bool) -> None:
        at = self.line[station]
        key = StreamKey(station, at.store.stream)
        moved = self.store.resume(key, at.store.receipted_upto())
        if moved is not None and receipts_arrive:
            self._receipt(station, key, moved)

    @rule(station=st.sampled_from(STATIONS))
    def station_restarts(self, station: str) -> None:
        at = self.line[station]
        at.store.close()
        self._open(station, at.data_dir, at.backup)

    @rule(station=st.sampled_from(STATIONS), parts=st.integers(0, 4))
    def station_storage_is_replaced(self, station: str, parts: int) -> None:
        """What was still in the old disk's outbox is lost with it; nothing else may be. The
        new disk decides `parts` before the link is up, then the broker's session hands it
        the receipts it kept for the old one (decision 0009)."""
        at = self.line[station]
        self.lost |= self._pending(at)
        at.store.close()
        shutil.rmtree(at.data_dir)
        self._new_disk(station)
        self.station_decides(station, parts)
        for receipt in [receipt for receipt in self.receipts if receipt.station == station]:
            self._deliver_receipt(station, receipt)

    @rule(station=st.sampled_from(STATIONS))
    def station_store_is_backed_up(self, station: str) -> None:
        at = self.line[station]
        at.backup = self.folder / f"{station}-backup-{self.disks}.db"
        at.backup.unlink(missing_ok=True)
        target = sqlite3.connect(at.backup)
        source = sqlite3.connect(at.data_dir / DB_FILE)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()

    @precondition(lambda self: not self.controller_replaced)
    @rule(station=st.sampled_from(STATIONS), parts=st.integers(0, 4))
    def station_store_is_restored_from_its_backup(self, station: str, parts: int) -> None:
        """Its outbox goes back to the backup's (what was added since is lost with the restore,
        unless it was sent), it gives out the seqs it gave out since again for new messages,
        decides `parts` before the link is up, and the broker hands it the kept receipts."""
        at = self.line[station]
        if at.backup is None:
            return
        self.restored = True
        before = self._pending(at)
        at.store.close()
        shutil.rmtree(at.data_dir)
        at.data_dir.mkdir()
        shutil.copyfile(at.backup, at.data_dir / DB_FILE)
        self._open(station, at.data_dir, at.backup)
        self.lost |= before - self._pending(self.line[station])
        self.station_decides(station, parts)
        for receipt in [receipt for receipt in self.receipts if receipt.station == station]:
            self._deliver_receipt(station, receipt)

    @rule()
    def controller_restarts(self) -> None:
        self.store.close()
        self.fleet = SqliteFleetStore(self.path)

    @precondition(lambda self: not self.restored)
    @rule()
    def controller_store_is_replaced(self) -> None:
        """Lost with the controller's disk: what it held and had receipted. (Not combined with
        a station restored from a backup: the receipts of the lost store that deleted a
        restored station's sent rows before they arrived would have come from the messages
        it lost under the same seqs: two failures at once.)"""
        self.controller_replaced = True
        self.lost |= self._held()
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.fleet = SqliteFleetStore(self.path)

    @rule(station=st.sampled_from(STATIONS))
    def station_delivers_everything_it_owes(self, station: str) -> None:
        """Its state, then its whole outbox through the broker, in order, with every receipt
        arriving: the outbox empties."""
        self.station_reports_its_state(station, receipts_arrive=True)
        at, broker = self.line[station], self.broker[station]
        at.cursor = at.relay.publish_pending(-1)
        payloads, broker.queue[:] = list(broker.queue), []
        self._ingest(payloads, receipts_arrive=True)
        assert at.store.outbox_depth() == 0, "the controller receipted all it was sent"

    def _held(self) -> set[str]:
        reader = sqlite3.connect(self.path)
        try:
            rows = reader.execute("SELECT station, stream, seq, msg_id FROM messages").fetchall()
        finally:
            reader.close()
        assert len({msg_id for *_, msg_id in rows}) == len(rows), "a msg_id stored twice"
        for station, stream, seq, msg_id in rows:
            assert self.given[msg_id] == (station, stream, seq)
        return {msg_id for *_, msg_id in rows}

    @invariant()
    def no_message_is_lost(self) -> None:
        if self.fleet is None:
            return
        pending = set().union(*(self._pending(at) for at in self.line.values()))
        in_broker = {
            str(p.parse(p.Decision, payload).msg_id)
            for broker in self.broker.values()
            for payload in broker.queue
        }
        missing = self.given.keys() - pending - in_broker - self._held() - self.lost
        assert not missing, f"deleted by a station, never stored by the controller: {missing}"


FleetIngestModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
test_ingest_stores_each_message_once_and_receipts_only_what_it_holds = FleetIngestModel.TestCase


StationsToControllerModel.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)
test_no_message_is_lost_between_the_outboxes_and_the_controller = (
    StationsToControllerModel.TestCase
)
