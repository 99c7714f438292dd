"""Incoming payloads are parsed strictly: every field must have its schema's JSON type (no
number from a string, no number from true/false, no integer from 1.0). What our own senders
write still parses. The relay's warnings about ignored receipts are rate-limited per kind."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edge_agent.relay import OutboxRelay, ReceiptWarnings
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.mqtt import ReceivedMessage
from linesight.protocol_doc import examples
from tests.unit.test_relay import FakeLink
from tests.unit.test_store import STATION, decision

pytestmark = pytest.mark.unit

TOPICS = p.Topics()
ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64)
STREAM = uuid.uuid4()
LOCAL = datetime(2026, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=2)))


def _drift() -> p.DriftSignal:
    return p.DriftSignal(
        psi_brightness=0, psi_contrast=0.2, psi_sharpness=1, psi_confidence=0.01,
        window_parts=200, drifting=True,
    )


def _state() -> p.StationState:
    """A state as the agent builds it, with every optional part filled in."""
    return p.StationState(
        station=STATION, seq=3, stream=STREAM, online=True, active=ACTIVE, candidate=CANDIDATE,
        previous=ACTIVE, mode=p.DeploymentMode.CANARY, automation=p.AutomationLevel.ASSIST,
        automation_note="set by badge-7", canary_fraction=0.25, serving="candidate",
        faults=[p.Fault(code="outbox_full", message="full", model=ACTIVE, since=LOCAL)],
        outbox_depth=4, receipted_upto=-1, review_queue_depth=1, unconfirmed_dropped=2,
        drift=_drift(), parts_inspected=9, labels={"line": "A", "cell": "7"},
        agent_version="0.1.0",
    )


def _senders_messages() -> list[p.Envelope]:
    """Messages built in Python as our senders build them, beyond the page's examples: int
    values for float fields, timestamps with offsets, nulls, nested models, dicts keyed by
    enums, every command body."""
    bodies: list[Any] = [
        p.DeployCandidate(url="http://fleet/b/", model=CANDIDATE, signature="c2ln",
                          mode=p.DeploymentMode.CANARY, canary_fraction=1),
        p.SetMode(mode=p.DeploymentMode.BLUE_GREEN, canary_fraction=0),
        p.SetAutomation(automation=p.AutomationLevel.FULL, reason="gates passed"),
        p.Promote(expect=CANDIDATE),
        p.Promote(),
        p.Rollback(reason="drift"),
        p.Switch(to="candidate"),
    ]
    commands: list[p.Envelope] = [
        p.Command(station=STATION, seq=n, cmd_id=uuid.uuid4(), body=body, rollout_id="r-1",
                  expires_at=LOCAL, signature="c2ln")
        for n, body in enumerate(bodies)
    ]
    return [
        _state(),
        p.StationState(station=STATION, seq=0, online=False),
        p.Decision(
            station=STATION, seq=5, stream=STREAM, ts=LOCAL, part_id="p-1",
            decided_by=p.DecidedBy.FAILSAFE, label=None, action=p.Action.REVIEW,
            review_reason=p.ReviewReason.FAILSAFE, model=None, latency_ms=0,
            automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.NONE,
        ),
        p.Decision(
            station=STATION, seq=6, part_id="p-2", decided_by=p.DecidedBy.CANDIDATE,
            label="ok", confidence=1, action=p.Action.PASS, model=CANDIDATE, latency_ms=12,
            automation=p.AutomationLevel.PARTIAL, mode=p.DeploymentMode.CANARY, suggestion="ok",
        ),
        p.ShadowResult(
            station=STATION, seq=7, part_id="p-3", mode=p.DeploymentMode.SHADOW,
            active=p.ModelOpinion(model=ACTIVE, label="ok", confidence=0, latency_ms=1),
            candidate=p.ModelOpinion(model=CANDIDATE, label=None, latency_ms=2.5,
                                     error="inference failed"),
            agree=False,
        ),
        p.Verdict(
            station=STATION, seq=8, part_id="p-4", operator="badge-1",
            outcome=p.VerdictOutcome.ESCALATE, label=None,
            review_reason=p.ReviewReason.DISAGREEMENT, candidate_label="ok", decided_at=LOCAL,
        ),
        p.StationMetrics(
            station=STATION, seq=9, window_s=10, parts=0, parts_missed=3,
            actions={p.Action.REVIEW: 1}, decided_by={p.DecidedBy.FAILSAFE: 1},
            agreement_rate=1,
            latency={
                "active": p.LatencySummary(p50_ms=1, p95_ms=2.5, p99_ms=3, count=1),
                "candidate": p.LatencySummary(p50_ms=0, p95_ms=0, p99_ms=0, count=0),
            },
            faults=1, drift=_drift(),
        ),
        p.CommandAck(station=STATION, seq=10, stream=STREAM, cmd_id=p.NIL_CMD_ID,
                     command="unknown", ok=False, error="unreadable", state_after=_state()),
        *commands,
        p.Receipt(station=STATION, seq=0, upto_seq=-1),
        p.Receipt(station=STATION, seq=p.SEQ_MAX, upto_seq=p.SEQ_MAX, upto_stream=STREAM),
        p.RolloutStatus(
            station=p.CONTROLLER_ID, seq=1, rollout_id="r-1", plan="canary", candidate=CANDIDATE,
            phase="waiting_approval", stage=1,
            stages=[p.StageStatus(index=0, name="s", mode="shadow", stations=[STATION],
                                  status="passed", gate=None)],
            reason="", touched=[STATION],
        ),
    ]


@pytest.mark.parametrize(
    "message", examples() + _senders_messages(), ids=lambda m: type(m).__name__
)
def test_what_our_senders_write_parses_back_strictly(message: p.Envelope) -> None:
    assert p.parse(type(message), message.to_json()) == message


def test_the_round_trips_cover_every_message_type_and_command() -> None:
    built = examples() + _senders_messages()
    assert {type(m) for m in built} == set(p.MESSAGE_TYPES)
    names = {m.body.name for m in built if isinstance(m, p.Command)}
    assert names == {"deploy_candidate", "set_mode", "set_automation", "promote", "rollback",
                     "switch"}


def _example(message_type: type[p.Envelope]) -> dict[str, Any]:
    built = _senders_messages() + examples()  # ours first: every optional part filled in
    found = next(m for m in built if type(m) is message_type)
    document: dict[str, Any] = json.loads(found.to_json())
    return document


def _set(document: dict[str, Any], where: str, value: object) -> None:
    *parents, leaf = where.split(".")
    target: Any = document
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(leaf)] = value
    else:
        target[leaf] = value


@pytest.mark.parametrize(
    ("message_type", "where", "value", "shown"),
    [
        (p.Receipt, "upto_seq", "9", '"9"'),
        (p.Receipt, "upto_seq", True, "true"),
        (p.Receipt, "upto_seq", 9.0, "9.0"),
        (p.Receipt, "seq", True, "true"),
        (p.Receipt, "seq", False, "false"),
        (p.Receipt, "seq", "1", '"1"'),
        (p.Decision, "latency_ms", "3.1", '"3.1"'),
        (p.Decision, "confidence", True, "true"),
        (p.Decision, "part_id", 42, "42"),
        (p.Decision, "ts", 1767225600, "1767225600"),
        (p.StationState, "online", 1, "1"),
        (p.StationState, "online", "true", '"true"'),
        (p.StationState, "outbox_depth", "4", '"4"'),
        (p.StationState, "faults.0.since", 0, "0"),
        (p.StationState, "drift.window_parts", 200.0, "200.0"),
        (p.StationState, "drift.drifting", 0, "0"),
        (p.StationState, "labels.line", 7, "7"),
        (p.StationMetrics, "actions.pass", "40", '"40"'),
        (p.StationMetrics, "latency.active.count", True, "true"),
        (p.StationMetrics, "window_s", "10", '"10"'),
        # The tagged union names the body's type in the path (as it did before).
        (p.Command, "body.canary_fraction", "0.5", '"0.5"'),
        (p.CommandAck, "ok", "true", '"true"'),
        (p.CommandAck, "state_after.seq", "3", '"3"'),
        (p.RolloutStatus, "stage", "0", '"0"'),
        (p.RolloutStatus, "stages.0.index", False, "false"),
        (p.RolloutStatus, "candidate", ["m"], "an array"),
        (p.Decision, "model", "part-classifier", '"part-classifier"'),
        (p.Decision, "part_id", {"id": 1}, "an object"),
        (p.Decision, "action", 1, "1"),
    ],
)
def test_a_field_of_the_wrong_json_type_is_refused_by_name(
    message_type: type[p.Envelope], where: str, value: object, shown: str
) -> None:
    document = _example(message_type)
    _set(document, where, value)
    named = where.replace("body.", "body.deploy_candidate.")
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(message_type, json.dumps(document))
    assert caught.value.field == named
    assert f"{named}: " in str(caught.value)
    assert f"got {shown}" in caught.value.reason, "the refusal says what it was given"


def test_timestamps_uuids_and_enum_values_are_still_taken_from_json_strings() -> None:
    document = json.loads(examples()[1].to_json())  # a decision by the active model
    document.update(ts="2026-01-01T09:00:00+02:00", msg_id=str(uuid.UUID(int=7)),
                    action="reject", decided_by="active")
    parsed = p.parse(p.Decision, json.dumps(document))
    assert parsed.ts == datetime(2026, 1, 1, 7, 0, tzinfo=UTC)
    assert parsed.msg_id == uuid.UUID(int=7)
    assert parsed.action is p.Action.REJECT


def test_an_integer_is_taken_for_a_float_field() -> None:
    """JSON has one number type: 3 for a float is 3.0, not a wrong type."""
    document = _example(p.Decision)
    document.update(latency_ms=3, confidence=1)
    parsed = p.parse(p.Decision, json.dumps(document))
    assert parsed.latency_ms == 3.0 and parsed.confidence == 1.0


def test_nesting_deeper_than_the_validator_takes_is_a_payload_error() -> None:
    """json.loads reads 300 levels; the validator's JSON reader stops before."""
    document = _example(p.Receipt)
    text = json.dumps(document)[:-1] + ', "x": ' + "[" * 300 + "]" * 300 + "}"
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Receipt, text)
    assert caught.value.field == "(payload)"
    assert "recursion limit" in caught.value.reason


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_json_in_another_encoding_than_utf8_is_a_payload_error(encoding: str) -> None:
    """JSON between systems is UTF-8 (RFC 8259); json.loads would guess the rest."""
    payload = p.Receipt(station=STATION, seq=0, upto_seq=3).to_json().decode().encode(encoding)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse(p.Receipt, payload)
    assert caught.value.field == "(payload)"


# --- the relay -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    with StationStore(tmp_path) as opened:
        for n in range(5):
            opened.enqueue(TOPICS.station(STATION, p.Channel.DECISION), 1, decision(f"part-{n}"))
        yield opened


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _relay(store: StationStore) -> tuple[OutboxRelay, Clock]:
    relay = OutboxRelay(
        store, FakeLink(), station=STATION, topics=TOPICS,  # type: ignore[arg-type]
        publish_batch=10, resend_after_s=10.0,
    )
    clock = Clock()
    relay.receipt_warnings.clock = clock
    relay.publish_pending(-1)
    return relay, clock


def _receipt_payload(store: StationStore, **changes: object) -> ReceivedMessage:
    body = p.Receipt(station=STATION, seq=1, upto_seq=4, upto_stream=store.stream)
    document = json.loads(body.to_json())
    document.update(changes)
    return ReceivedMessage(TOPICS.station(STATION, p.Channel.RECEIPT),
                           json.dumps(document).encode(), 1, False)


def test_a_receipt_with_a_string_for_its_seq_deletes_nothing(
    store: StationStore, caplog: pytest.LogCaptureFixture
) -> None:
    relay, _ = _relay(store)
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        relay.on_receipt(_receipt_payload(store, upto_seq="4"))
        relay.on_receipt(_receipt_payload(store, upto_seq=True))
    assert store.outbox_depth() == 5
    assert "upto_seq" in caplog.records[0].getMessage()
    relay.on_receipt(_receipt_payload(store))
    assert store.outbox_depth() == 0


def test_ignored_receipts_are_warned_of_once_a_minute_per_kind_and_counted(
    store: StationStore, caplog: pytest.LogCaptureFixture
) -> None:
    relay, clock = _relay(store)
    unreadable = ReceivedMessage("x", b"{not json", 1, False)
    elsewhere = _receipt_payload(store, station="other-station")
    other_stream = _receipt_payload(store, upto_stream=str(uuid.uuid4()))
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        for _ in range(100):
            relay.on_receipt(unreadable)
            relay.on_receipt(elsewhere)
            relay.on_receipt(other_stream)
    first = [r.getMessage() for r in caplog.records]
    assert len(first) == 3, "one warning per kind, the first of each"
    assert "not JSON" in first[0]
    assert "addressed to other-station" in first[1]
    assert "seq stream" in first[2] and str(store.stream) in first[2]
    assert all("not logged for a minute" in text for text in first)
    assert relay.receipt_warnings.counts == {
        "unreadable": 100, "other station": 100, "other stream": 100
    }
    assert store.outbox_depth() == 5, "none of them deleted anything"

    caplog.clear()
    clock.now += 59.0
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        relay.on_receipt(unreadable)
    assert caplog.records == [], "still within the minute"
    clock.now += 1.0
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        relay.on_receipt(unreadable)
        relay.on_receipt(elsewhere)
    later = [r.getMessage() for r in caplog.records]
    assert len(later) == 2
    assert "100 more like it were not logged" in later[0]
    assert "99 more like it were not logged" in later[1]
    assert relay.receipt_warnings.counts["unreadable"] == 102


def test_each_relay_limits_its_own_warnings(
    store: StationStore, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = _relay(store)
    second, _ = _relay(store)
    unreadable = ReceivedMessage("x", b"{not json", 1, False)
    with caplog.at_level(logging.WARNING, logger="edge_agent.relay"):
        first.on_receipt(unreadable)
        second.on_receipt(unreadable)
    assert len(caplog.records) == 2
    assert second.receipt_warnings.counts == {"unreadable": 1}


def test_warnings_held_back_are_counted_only_for_their_kind() -> None:
    clock = Clock()
    warnings = ReceiptWarnings(clock=clock)
    assert warnings.warn("a", "first a") is True
    assert warnings.warn("a", "second a") is False
    assert warnings.warn("b", "first b") is True
    clock.now += 60.0
    assert warnings.warn("b", "again b") is True
    assert warnings.counts == {"a": 2, "b": 2}
