"""Storage lost on either side of the outbox, and nothing the stations send after it is lost.

A station's wiped `data_dir` starts its seq again at 0: its store numbers messages in a new seq
stream, so the controller stores them beside the old ones instead of taking them for copies,
and receipts them per stream. A station whose `data_dir` was restored from a backup gives out
seqs again, in the same stream, for new messages: the controller stores a message under a
taken seq beside the first, and the relay deletes only rows it has sent. A controller whose
store lost what it had receipted continues each stream from the `receipted_upto` that the
station's state reports, instead of waiting for seqs that will never come again.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker, free_port
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import served_controller, station_config

STATION = "press-09"


def inspect(data: Path, broker_url: str, parts: int, seed: int = 11) -> uuid.UUID:
    """Run the station for `parts` parts against the controller; its stream, once delivered."""
    config = station_config(
        data, broker_url, station=STATION, max_parts=parts, source=f"synthetic:seed={seed}"
    )
    assert Agent(config).run() == 0
    with StationStore(data) as store:
        assert store.outbox_depth() == 0, "every message was receipted"
        assert store.stream is not None
        return store.stream


def inspect_offline(data: Path, parts: int) -> None:
    """The station inspects with its broker unreachable: everything stays in its outbox."""
    config = station_config(
        data, f"mqtt://127.0.0.1:{free_port()}", station=STATION, max_parts=parts,
        outbox__receipt_wait_s=0.2,
    )
    assert Agent(config).run() == 0
    with StationStore(data) as store:
        assert store.outbox_depth() >= parts


def stale_receipts(
    broker_url: str, streams: list[uuid.UUID | None], upto_seq: int = 10_000
) -> None:
    link = MqttLink(LinkConfig(url=broker_url, client_id="stale-controller"))
    link.start()
    try:
        assert link.wait_connected(10)
        topic = p.Topics().station(STATION, p.Channel.RECEIPT)
        for stream in streams:
            receipt = p.Receipt(station=STATION, seq=1, upto_seq=upto_seq, upto_stream=stream)
            assert link.publish(topic, receipt.to_json(), qos=1).wait(10)
    finally:
        link.stop()


def test_a_station_whose_storage_was_replaced_loses_nothing(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / STATION
    with served_controller(tmp_path, broker.url) as (controller, _):
        first = inspect(data, broker.url, 20)
        shutil.rmtree(data)  # a new disk: the station starts again at seq 0
        # Receipts the broker keeps for the station's outbox session meanwhile (the old disk's
        # stream's, and one naming none, as a controller from before streams sent). They
        # arrive on the first connect, while the new disk's outbox holds more than one publish
        # batch: applied, they would delete what was not yet sent (without the relay's check
        # of the stream, 205 of these 405 decisions were lost).
        stale_receipts(broker.url, [first, None])
        inspect_offline(data, 400)  # the new disk's first parts wait in its outbox
        second = inspect(data, broker.url, 5, seed=12)
        assert second != first

        decisions = controller.store.decisions(station=STATION)
        assert len(decisions) == 425, "every decision of both disks reached the controller"
        for stream, parts in ((first, 20), (second, 405)):
            ours = [d for d in decisions if d.stream == stream]
            assert len(ours) == parts
            assert [d.seq for d in ours] == sorted(d.seq for d in ours)
            assert controller.store.contiguous(STATION, stream) >= max(d.seq for d in ours)
            assert min(d.seq for d in ours) == 0, "each stream starts at seq 0"
        assert controller.store.contiguous(STATION) == -1, "no message came without a stream"
        assert {record.station for record in controller.store.stations()} == {STATION}


def test_a_station_restored_from_a_backup_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    data, backup = tmp_path / STATION, tmp_path / "backup"
    with served_controller(tmp_path, broker.url) as (controller, _):
        stream = inspect(data, broker.url, 20)
        shutil.copytree(data, backup)
        assert inspect(data, broker.url, 30, seed=12) == stream
        shutil.rmtree(data)
        shutil.copytree(backup, data)  # seq goes back from 50 to 20, in the same stream
        # A receipt the broker kept for the station from before the restore arrives on the
        # first connect, while the outbox holds the 400 parts below: it covers seqs the
        # controller holds under other messages, so it must delete nothing not yet sent.
        stale_receipts(broker.url, [stream], upto_seq=49)
        inspect_offline(data, 400)  # seqs 20 to 49 again, for other parts, and on
        assert inspect(data, broker.url, 5, seed=13) == stream

        decisions = controller.store.decisions(station=STATION)
        assert len({d.msg_id for d in decisions}) == len(decisions) == 20 + 30 + 405, (
            "every decision before the backup, after it, and after the restore"
        )
        assert {d.stream for d in decisions} == {stream}
        assert sorted({d.seq for d in decisions}) == list(range(425))
        assert controller.store.contiguous(STATION, stream) == 424


def test_a_controller_whose_store_was_lost_receipts_what_comes_next(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / STATION
    with served_controller(tmp_path / "before", broker.url) as (before, _):
        stream = inspect(data, broker.url, 20)
        assert before.store.contiguous(STATION, stream) >= 19
    # A new fleet store (a replaced disk, or a restore from an older backup): without the
    # station's receipted_upto it would wait for seq 0 for ever and receipt nothing.
    with served_controller(tmp_path / "after", broker.url) as (after, _):
        assert inspect(data, broker.url, 10, seed=12) == stream  # the outbox ends empty
        decisions = after.store.decisions(station=STATION)
        assert len(decisions) == 10 and {d.stream for d in decisions} == {stream}
        assert after.store.contiguous(STATION, stream) >= max(d.seq for d in decisions)
