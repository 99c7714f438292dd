"""What the fleet controller takes from stations: every kind of bad message is refused alone,
counted, logged without flooding the log, and never counts toward a rollout's gate. The
controller is real (SQLite store, signed bundle) but never started: messages go in through
`Controller.ingest` as they come off MQTT."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.controller import Controller
from linesight import protocol as p
from linesight.mqtt import ReceivedMessage
from tests.support import unstarted_controller
from tests.unit.test_fleet_store import CANDIDATE, decision, shadow, verdict

TOPICS = p.Topics()
SINCE = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    built = unstarted_controller(tmp_path)
    try:
        yield built
    finally:
        built.store.close()


def raw(station: str, channel: p.Channel, payload: bytes) -> ReceivedMessage:
    return ReceivedMessage(TOPICS.station(station, channel), payload, 1, False)


def received(message: p.Envelope) -> ReceivedMessage:
    return raw(message.station, p.Channel(message.kind), message.to_json())


def edited(message: p.Envelope, text: str = "", **changes: object) -> bytes:
    """`message` as JSON with `changes` made, then `text` pairs 'old=>new' replaced in it."""
    document = json.loads(message.to_json())
    document.update(changes)
    payload = json.dumps(document)
    for pair in filter(None, text.split("|")):
        old, new = pair.split("=>")
        assert old in payload, old
        payload = payload.replace(old, new)
    return payload.encode()


DISAGREEMENT = shadow("s2", 5, "s2-p5", "ok", "defect")
ACK = p.CommandAck(station="s2", seq=5, cmd_id=uuid.uuid4(), command="promote", ok=True)
STATE = p.StationState(station="s2", seq=5, online=True, labels={"line": "L1"})

# Each would, if it were taken, store a message of s2 at seq 5 (or change s2's state).
BAD: dict[str, tuple[p.Channel, bytes]] = {
    "station differs from its topic": (p.Channel.SHADOW, DISAGREEMENT.to_json()),
    "a verdict on the shadow topic": (
        p.Channel.SHADOW, verdict("s2", 5, "s2-p5", "defect").to_json()),
    "a decision on the verdict topic": (p.Channel.VERDICT, decision("s2", 5).to_json()),
    "unknown schema": (p.Channel.SHADOW, edited(DISAGREEMENT, schema="linesight/v2")),
    "no schema": (p.Channel.SHADOW, edited(DISAGREEMENT, schema=None)),
    "not JSON": (p.Channel.SHADOW, b"part s2-p5 failed"),
    "not UTF-8": (p.Channel.SHADOW, b'{"schema": "linesight/v1", "station": "s2\xff"}'),
    "deeply nested": (p.Channel.SHADOW, b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "a JSON array": (p.Channel.SHADOW, b"[]"),
    "NaN latency": (p.Channel.SHADOW, edited(DISAGREEMENT, '"latency_ms": 5.0=>"latency_ms": NaN')),
    "Infinity latency": (
        p.Channel.SHADOW, edited(DISAGREEMENT, '"latency_ms": 5.0=>"latency_ms": Infinity')),
    "1e999 latency": (
        p.Channel.SHADOW, edited(DISAGREEMENT, '"latency_ms": 5.0=>"latency_ms": 1e999')),
    "negative latency": (
        p.Channel.SHADOW, edited(DISAGREEMENT, '"latency_ms": 5.0=>"latency_ms": -5.0')),
    "confidence above 1": (
        p.Channel.DECISION, edited(decision("s2", 5), '"confidence": 0.9=>"confidence": 9e9')),
    "negative seq": (p.Channel.SHADOW, edited(DISAGREEMENT, seq=-1)),
    "ts past year 9999 in UTC": (
        p.Channel.SHADOW, edited(DISAGREEMENT, ts="9999-12-31T23:00:00-05:00")),
    "ts without a zone": (p.Channel.SHADOW, edited(DISAGREEMENT, ts="2025-03-04T06:00:00")),
    "a lone surrogate in an ack": (p.Channel.ACK, edited(ACK, command="promote\udc80")),
    "a lone surrogate in a state": (p.Channel.STATE, edited(STATE, agent_version="\ud800")),
    "a lone surrogate in a label's name": (
        p.Channel.STATE, edited(STATE, labels={"line\udfff": "L2"})),
}
ON_S1_TOPIC = {"station differs from its topic"}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_message_is_refused_alone_and_counts_for_nothing(
    controller: Controller, case: str
) -> None:
    channel, payload = BAD[case]
    station = "s1" if case in ON_S1_TOPIC else "s2"
    upto = controller.ingest([
        received(shadow("s2", 0, "s2-p0", "ok", "defect")),
        received(verdict("s2", 1, "s2-p0", "defect")),
        received(STATE),
        raw(station, channel, payload),
        received(decision("s3", 0)),
    ])
    assert controller.counters.invalid == 1, case
    assert controller.counters.stored == 3
    assert {(key.station, seq) for key, seq in upto.items()} == {("s2", 1), ("s3", 0)}
    assert controller.store.contiguous("s1") == -1
    evidence = controller.store.paired_evidence(["s1", "s2"], SINCE, CANDIDATE.sha256)
    assert (evidence.overall.parts, evidence.overall.disagreements) == (1, 1)
    assert evidence.overall.labelled_disagreements == 1
    records = {record.station: record for record in controller.store.stations()}
    assert records["s2"].state == STATE and records["s2"].labels == {"line": "L1"}


@pytest.mark.parametrize(
    ("message_type", "document"),
    [
        (p.StationState, {**json.loads(STATE.to_json()), "agent_version": "1.0\ud800"}),
        (p.StationState, {**json.loads(STATE.to_json()), "labels": {"\udfff": "L1"}}),
        (p.CommandAck, {**json.loads(ACK.to_json()), "command": "\udc80"}),
    ],
)
def test_a_lone_surrogate_is_refused_naming_where_it_is(
    message_type: type[p.Envelope], document: dict[str, object]
) -> None:
    """JSON may escape half a UTF-16 pair (\\ud800) on its own; no UTF-8 text holds one, so a
    message carrying it could be neither stored nor sent on."""
    for payload in (json.dumps(document).encode(),
                    json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")):
        with pytest.raises(p.ProtocolError, match="surrogate") as caught:
            p.parse(message_type, payload)
        assert caught.value.field in {"agent_version", "labels.?", "command"}


def test_a_valid_surrogate_pair_is_taken() -> None:
    document = {**json.loads(STATE.to_json()), "agent_version": "\ud83d\ude00"}
    assert p.parse(p.StationState, json.dumps(document)).agent_version == "\U0001f600"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.name == "deploy.controller"]


def test_a_flood_of_invalid_messages_is_logged_once_a_minute_per_station(
    controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    controller.monotonic = lambda: clock[0]
    caplog.set_level(logging.WARNING)
    flood = [raw("s1", p.Channel.DECISION, b"garbage %d" % index) for index in range(500)]
    controller.ingest([*flood, raw("s2", p.Channel.VERDICT, b"{}"), received(decision("s3", 0))])
    assert controller.counters.invalid == 501 and controller.counters.stored == 1
    logged = warnings_of(caplog)
    assert len(logged) == 2, logged
    assert "stations/s1/decision" in logged[0] and "not JSON" in logged[0]
    assert "stations/s2/verdict" in logged[1]

    caplog.clear()
    clock[0] += 30
    controller.ingest([raw("s1", p.Channel.SHADOW, b"garbage 500")])
    assert warnings_of(caplog) == []

    clock[0] += 31  # a minute after s1's first warning: what came since is summed up
    controller.ingest([received(decision("s3", 1))])
    logged = warnings_of(caplog)
    assert len(logged) == 1, logged
    assert "s1" in logged[0] and "500 more" in logged[0] and "stations/s1/shadow" in logged[0]

    caplog.clear()
    clock[0] += 61
    controller.ingest([received(decision("s3", 2))])
    assert warnings_of(caplog) == []
    controller.ingest([raw("s1", p.Channel.DECISION, b"garbage 501")])
    assert len(warnings_of(caplog)) == 1  # a new flood is told of again
    assert controller.counters.invalid == 503


def test_a_msg_id_sent_again_with_other_content_counts_once(controller: Controller) -> None:
    """A copy is known by its msg_id: the first one stored is the one the gate counts."""
    first = shadow("s2", 0, "s2-p0", "ok", "defect")
    again = first.model_copy(update={
        "candidate": first.candidate.model_copy(update={"label": "ok"}), "agree": True,
    })
    controller.ingest([received(first)])
    controller.ingest([received(again), received(again)])
    evidence = controller.store.paired_evidence(["s2"], SINCE, CANDIDATE.sha256)
    assert (evidence.overall.parts, evidence.overall.disagreements) == (1, 1)


def test_a_verdict_on_a_part_never_decided_labels_nothing(controller: Controller) -> None:
    controller.ingest([
        received(shadow("s2", 0, "s2-p0", "ok", "defect")),
        received(verdict("s2", 1, "s2-ghost", "defect")),
        received(verdict("s1", 0, "s2-p0", "defect")),  # another station's part of that name
    ])
    assert controller.counters.invalid == 0
    assert controller.store.contiguous("s1") == 0 and controller.store.contiguous("s2") == 1
    evidence = controller.store.paired_evidence(["s1", "s2"], SINCE, CANDIDATE.sha256)
    assert (evidence.overall.parts, evidence.overall.disagreements) == (1, 1)
    assert evidence.overall.labelled_disagreements == 0


def test_a_metrics_report_dated_far_ahead_does_not_hide_the_later_ones(
    controller: Controller,
) -> None:
    """A station whose clock once jumped years ahead (then was set right) shows its current
    metrics, not that one report's for ever."""
    now = datetime.now(UTC)
    ahead = p.StationMetrics(station="s2", seq=0, ts=now + timedelta(days=3650), window_s=10,
                             parts=1)
    controller.ingest([received(ahead)])
    controller.ingest([received(p.StationMetrics(station="s2", seq=0, ts=now, window_s=10,
                                                 parts=7))])
    (record,) = controller.store.stations()
    assert record.latest_metrics is not None and record.latest_metrics.parts == 7
