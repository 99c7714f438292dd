"""The MQTT contract: round trips, refusals that name the field, topics, and the generated page."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linesight import protocol as p
from linesight.protocol_doc import examples, render

REPO = Path(__file__).resolve().parents[2]
REF = p.ModelRef(name="part-classifier", version="1.0.0", sha256="c" * 64)


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message: p.Envelope) -> None:
    assert p.parse(type(message), message.to_json()) == message


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in examples()} == set(p.MESSAGE_TYPES)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"not json", "(payload)"),
        (b"[1, 2]", "(payload)"),
        (b'{"schema": "linesight/v2", "station": "s1"}', "schema"),
        (b'{"station": "s1"}', "schema"),
    ],
)
def test_unreadable_payloads_name_the_problem(payload: bytes, field: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Decision, payload)
    assert caught.value.field == field


def _decision(**changes: object) -> dict[str, object]:
    document = json.loads(examples()[1].to_json())
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": "NaN"}, "confidence"),
        ({"action": "maybe"}, "action"),
        ({"station": "bad station/id"}, "station"),
        ({"seq": -1}, "seq"),
        ({"msg_id": "not-a-uuid"}, "msg_id"),
        ({"ts": "2026-01-01T00:00:00"}, "ts"),
        ({"surprise": 1}, "surprise"),
        ({"model": {"name": "m", "version": "one", "sha256": "0" * 64}}, "model.version"),
    ],
)
def test_bad_fields_are_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Decision, json.dumps(_decision(**changes)))
    assert caught.value.field == field
    assert field in str(caught.value)


def test_failsafe_never_passes_a_part() -> None:
    document = _decision(decided_by="failsafe", action="pass")
    with pytest.raises(p.ProtocolError, match="never passes"):
        p.parse(p.Decision, json.dumps(document))


def test_review_needs_a_reason() -> None:
    with pytest.raises(p.ProtocolError, match="review_reason"):
        p.parse(p.Decision, json.dumps(_decision(action="review", review_reason=None)))


def test_shadow_agreement_must_match_labels() -> None:
    document = json.loads(examples()[2].to_json())
    document["candidate"]["label"] = "ok"
    with pytest.raises(p.ProtocolError, match="agree"):
        p.parse(p.ShadowResult, json.dumps(document))


def test_command_bodies_are_a_tagged_union() -> None:
    command = p.Command(
        station="s1", seq=1, cmd_id=uuid.uuid4(), body=p.SetMode(mode="canary", canary_fraction=0.1)
    )
    parsed = p.parse(p.Command, command.to_json())
    assert isinstance(parsed.body, p.SetMode)
    document = json.loads(command.to_json())
    document["body"]["name"] = "format_disk"
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Command, json.dumps(document))
    assert caught.value.field.startswith("body")


def test_a_seq_stream_is_sent_only_when_there_is_one() -> None:
    """Peers built before `stream` and `upto_stream` refuse unknown keys: an unset one is left
    out, not sent as null."""
    receipt = p.Receipt(station="s1", seq=0, upto_seq=3)
    assert "upto_stream" not in json.loads(receipt.to_json())
    assert "stream" not in json.loads(receipt.to_json())
    stream = uuid.uuid4()
    named = p.Receipt(station="s1", seq=0, upto_seq=3, upto_stream=stream, stream=stream)
    document = json.loads(named.to_json())
    assert document["upto_stream"] == document["stream"] == str(stream)
    assert p.parse(p.Receipt, named.to_json()) == named
    document.update(stream=None, upto_stream=None)
    assert p.parse(p.Receipt, json.dumps(document)).upto_stream is None
    document["upto_stream"] = "not-a-uuid"
    with pytest.raises(p.ProtocolError, match="upto_stream"):
        p.parse(p.Receipt, json.dumps(document))


def test_timestamps_are_normalised_to_utc() -> None:
    local = datetime(2026, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=2)))
    receipt = p.Receipt(station="s1", seq=0, ts=local, upto_seq=3)
    assert receipt.ts == datetime(2026, 1, 1, 7, 0, tzinfo=UTC)
    assert receipt.ts.utcoffset() == timedelta(0)


def test_topics_live_under_the_prefix() -> None:
    topics = p.Topics("site-9/linesight/v1")
    topic = topics.station("press-01", p.Channel.DECISION)
    assert topic == "site-9/linesight/v1/stations/press-01/decision"
    assert topics.parse_station_topic(topic) == p.StationTopic("press-01", p.Channel.DECISION)
    assert topics.every_station(p.Channel.ACK) == "site-9/linesight/v1/stations/+/ack"
    assert topics.rollout() == "site-9/linesight/v1/fleet/rollout"


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#", "/lead", "trail/"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        p.Topics(prefix)


def test_foreign_topics_are_refused() -> None:
    topics = p.Topics()
    for topic in ("other/v1/stations/s1/decision", "linesight/v1/stations/s1/format"):
        with pytest.raises(ValueError, match="topic"):
            topics.parse_station_topic(topic)
    with pytest.raises(ValueError, match="station id"):
        topics.station("a/b", p.Channel.STATE)


def test_durable_channels_are_the_ones_the_controller_receipts() -> None:
    durable = {ch for ch, delivery in p.DELIVERY.items() if delivery.durable}
    assert durable == {p.Channel.DECISION, p.Channel.SHADOW, p.Channel.VERDICT, p.Channel.ACK}
    assert p.DELIVERY[p.Channel.STATE].retain and p.ROLLOUT_DELIVERY.retain


def test_protocol_page_is_current() -> None:
    page = (REPO / "docs" / "protocol.md").read_text()
    assert page == render(), (
        "docs/protocol.md is stale: python -m linesight.protocol_doc > docs/protocol.md"
    )


# --- property tests -------------------------------------------------------------------------

station_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
labels = st.sampled_from(["ok", "defect"])
confidences = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(
    station=station_ids,
    seq=st.integers(min_value=0, max_value=2**53),
    part_id=st.text(min_size=1, max_size=40),
    label=labels,
    confidence=confidences,
    latency=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    action=st.sampled_from([p.Action.PASS, p.Action.REJECT]),
)
def test_decision_round_trip_property(
    station: str,
    seq: int,
    part_id: str,
    label: str,
    confidence: float,
    latency: float,
    action: p.Action,
) -> None:
    decision = p.Decision(
        station=station,
        seq=seq,
        part_id=part_id,
        decided_by=p.DecidedBy.ACTIVE,
        label=label,
        confidence=confidence,
        action=action,
        model=REF,
        latency_ms=latency,
        automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.NONE,
    )
    assert p.parse(p.Decision, decision.to_json()) == decision


@given(a=labels, b=labels, ca=confidences, cb=confidences, station=station_ids)
def test_shadow_round_trip_property(a: str, b: str, ca: float, cb: float, station: str) -> None:
    result = p.ShadowResult(
        station=station,
        seq=1,
        part_id="x",
        mode=p.DeploymentMode.SHADOW,
        active=p.ModelOpinion(model=REF, label=a, confidence=ca, latency_ms=1),
        candidate=p.ModelOpinion(model=REF, label=b, confidence=cb, latency_ms=1),
        agree=a == b,
    )
    assert p.parse(p.ShadowResult, result.to_json()) == result


@given(upto=st.integers(min_value=-1, max_value=2**40), station=station_ids)
def test_receipt_round_trip_property(upto: int, station: str) -> None:
    receipt = p.Receipt(station=station, seq=0, upto_seq=upto)
    assert p.parse(p.Receipt, receipt.to_json()) == receipt


@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(payload: bytes) -> None:
    for message_type in p.MESSAGE_TYPES:
        try:
            p.parse(message_type, payload)
        except p.ProtocolError:
            pass


@given(
    document=st.dictionaries(
        st.sampled_from(["schema", "station", "seq", "part_id", "action", "cmd_id", "body"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=10), st.floats()),
    )
)
def test_arbitrary_json_objects_never_crash_the_parser(document: dict[str, object]) -> None:
    document["schema"] = p.SCHEMA
    for message_type in p.MESSAGE_TYPES:
        try:
            p.parse(message_type, json.dumps(document))
        except p.ProtocolError:
            pass


@pytest.mark.parametrize(
    "payload",
    [
        b'{"schema": "linesight/v1", "seq": ' + b"9" * 5000 + b"}",  # int() digit limit
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the interpreter's stack
        b"\xff\xfe",
    ],
)
def test_any_unreadable_payload_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError, match="not JSON"):
        p.parse(p.Command, payload)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity"])
@pytest.mark.parametrize(
    "where",
    ["latency.active.p95_ms", "window_s", "drift.psi_brightness"],
)
def test_no_infinite_or_nan_number_is_accepted(number: str, where: str) -> None:
    """JSON has no inf or nan: a store keeping such a document would write null back, and every
    later read of it would fail. They are refused at the door, naming the field."""
    metrics = p.StationMetrics(
        station="s1", seq=1, window_s=10, parts=5,
        latency={"active": p.LatencySummary(p50_ms=1, p95_ms=2, p99_ms=3, count=5)},
        drift=p.DriftSignal(
            psi_brightness=0.1, psi_contrast=0.1, psi_sharpness=0.1, psi_confidence=0.1,
            window_parts=50, drifting=False,
        ),
    )
    text = metrics.to_json()
    document = json.loads(text)
    target = document
    *parents, leaf = where.split(".")
    for key in parents:
        target = target[key]
    target[leaf] = 12345.678
    text = json.dumps(document).replace("12345.678", number)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.StationMetrics, text)
    assert caught.value.field == where


def test_a_timestamp_outside_the_utc_range_is_a_protocol_error() -> None:
    document = json.loads(p.Receipt(station="s1", seq=0, upto_seq=3).to_json())
    document["ts"] = "9999-12-31T23:00:00-05:00"
    with pytest.raises(p.ProtocolError, match="ts"):
        p.parse(p.Receipt, json.dumps(document))


def test_a_seq_beyond_what_sqlite_holds_is_a_protocol_error() -> None:
    """Parsed, it would fail the controller's whole ingest batch with an OverflowError."""
    document = json.loads(p.Receipt(station="s1", seq=0, upto_seq=3).to_json())
    document["seq"] = 2**63
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Receipt, json.dumps(document))
    assert caught.value.field == "seq"
    document.update(seq=p.SEQ_MAX, upto_seq=2**63)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Receipt, json.dumps(document))
    assert caught.value.field == "upto_seq"
