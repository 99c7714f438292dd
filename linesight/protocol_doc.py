"""Render docs/protocol.md from the message schemas, so the page can never drift from the code.

Run `python -m linesight.protocol_doc > docs/protocol.md`; a test fails when the page is stale.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from linesight import protocol as p

_TS = datetime(2026, 3, 2, 7, 30, 0, tzinfo=UTC)
_ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
_CANDIDATE = p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64)
_STREAM = uuid.UUID("5d8ed8dc-537a-4499-940a-bdbb53c7048f")


def _id(n: int) -> uuid.UUID:
    return uuid.UUID(int=n, version=4)


def examples() -> list[p.Envelope]:
    """One realistic example per message type, in the order the page presents them."""
    state = p.StationState(
        msg_id=_id(1), station="press-01", seq=41, stream=_STREAM, ts=_TS, online=True,
        active=_ACTIVE, candidate=_CANDIDATE, mode=p.DeploymentMode.SHADOW,
        automation=p.AutomationLevel.PARTIAL, outbox_depth=3, receipted_upto=38,
        review_queue_depth=2,
        parts_inspected=1200, labels={"line": "A"}, agent_version="0.1.0",
    )
    return [
        state,
        p.Decision(
            msg_id=_id(2), station="press-01", seq=42, stream=_STREAM, ts=_TS,
            part_id="syn-7-00000042",
            decided_by=p.DecidedBy.ACTIVE, label="defect", confidence=0.97,
            action=p.Action.REJECT, model=_ACTIVE, latency_ms=3.1,
            automation=p.AutomationLevel.PARTIAL, mode=p.DeploymentMode.SHADOW,
            suggestion="defect",
        ),
        p.ShadowResult(
            msg_id=_id(3), station="press-01", seq=43, stream=_STREAM, ts=_TS,
            part_id="syn-7-00000042",
            mode=p.DeploymentMode.SHADOW,
            active=p.ModelOpinion(model=_ACTIVE, label="defect", confidence=0.97, latency_ms=3.1),
            candidate=p.ModelOpinion(
                model=_CANDIDATE, label="defect", confidence=0.99, latency_ms=4.0
            ),
            agree=True,
        ),
        p.Verdict(
            msg_id=_id(4), station="press-01", seq=44, stream=_STREAM, ts=_TS,
            part_id="syn-7-00000043",
            operator="badge-1042", outcome=p.VerdictOutcome.REJECT, label="defect",
            review_reason=p.ReviewReason.LOW_CONFIDENCE, model_label="ok", decided_at=_TS,
        ),
        p.StationMetrics(
            msg_id=_id(5), station="press-01", seq=44, ts=_TS, window_s=10.0, parts=50,
            actions={p.Action.PASS: 40, p.Action.REJECT: 8, p.Action.REVIEW: 2},
            decided_by={p.DecidedBy.ACTIVE: 48, p.DecidedBy.OPERATOR: 2}, shadow_pairs=50,
            agreement_rate=0.98,
            latency={"active": p.LatencySummary(p50_ms=2.9, p95_ms=3.8, p99_ms=4.4, count=50)},
            outbox_depth=3,
        ),
        p.Command(
            msg_id=_id(6), station="press-01", seq=7, ts=_TS, cmd_id=_id(60),
            rollout_id="r-20260302-01",
            body=p.DeployCandidate(
                url="http://fleet.line.local:8700/bundles/part-classifier/2.0.0/",
                model=_CANDIDATE, signature="BASE64-ED25519-SIGNATURE-OF-MANIFEST",
                mode=p.DeploymentMode.SHADOW,
            ),
            signature="BASE64-ED25519-SIGNATURE-OF-THE-COMMAND",
        ),
        p.CommandAck(
            msg_id=_id(7), station="press-01", seq=45, stream=_STREAM, ts=_TS, cmd_id=_id(60),
            command="deploy_candidate", ok=True,
        ),
        p.Receipt(
            msg_id=_id(8), station="press-01", seq=8, ts=_TS, upto_seq=45, upto_stream=_STREAM
        ),
        p.RolloutStatus(
            msg_id=_id(9), station=p.CONTROLLER_ID, seq=9, ts=_TS, rollout_id="r-20260302-01",
            plan="shadow-first", candidate=_CANDIDATE, phase="running", stage=0,
            stages=[
                p.StageStatus(
                    index=0, name="shadow on press-01", mode="shadow", stations=["press-01"],
                    status="running", gate="continue: 12 of 20 labelled disagreements",
                )
            ],
            touched=["press-01"],
        ),
    ]


_PURPOSE: dict[str, str] = {
    "StationState": "The station's current state: models, mode, automation level, faults and "
    "queues. Retained, so a new subscriber sees it at once; the broker publishes the same "
    "message with `online: false` as the station's Last Will when its connection drops. "
    "`receipted_upto` (with the seq `stream` it counts in) is the highest seq the station "
    "deleted on a receipt: a controller that lost messages it had receipted (its store "
    "restored from a backup, or replaced) continues the stream's watermark from there instead "
    "of waiting for them for ever.",
    "Decision": "One per inspected part: what the station did with it (`pass`, `reject` or "
    "`review`), who decided, and with which model. This is the message to feed a MES.",
    "ShadowResult": "One per part that both the active and the candidate model judged: both "
    "opinions and whether they agree.",
    "Verdict": "An operator's judgement of a part from the station screen: the ground truth "
    "that rollout gates use. An escalation (`outcome` escalate, no label) is followed by a "
    "second Verdict for the same part once a supervisor gives the final pass or reject: a "
    "part's truth is its latest verdict with a label.",
    "StationMetrics": "Counters over the last window: throughput, actions, agreement, latency "
    "percentiles, outbox depth. QoS 0: a lost sample is replaced by the next one.",
    "Command": "From the fleet controller to one station. `body.name` selects the command: "
    "`deploy_candidate`, `set_mode`, `set_automation`, `promote`, `rollback`, `switch`. "
    "A repeated `cmd_id` is acknowledged again but not carried out twice; a command past "
    "`expires_at` is refused. `signature` is the controller's Ed25519 signature (base64) over "
    "the command's canonical JSON without `signature` (keys sorted, no whitespace; "
    "`linesight.command_auth`): a station configured with the controller's public command key "
    "refuses, with an error ack, any command whose signature is missing or does not match.",
    "CommandAck": "The station's answer to a command: `ok`, or the error that stopped it.",
    "Receipt": "From the controller: every message of this station's seq stream "
    "`upto_stream` up to `upto_seq` is stored. Only then does the station delete those "
    "messages from its outbox, and only those it has sent since it started: a row not sent "
    "yet may hold another message under a seq the controller holds (a station whose store "
    "was restored from a backup gives out seqs again). A receipt for another stream (one that "
    "the broker kept for this station id before its storage was replaced) deletes nothing.",
    "RolloutStatus": "The current (or last) rollout: phase, stage by stage, and why it "
    "ended. Retained on the fleet topic.",
}


def _topic_of(message: p.Envelope, topics: p.Topics) -> str:
    return topics.topic_for(message).replace("press-01", "{station}")


def render() -> str:
    topics = p.Topics()
    lines = [
        "# The MQTT contract, v1",
        "",
        "<!-- Generated by `python -m linesight.protocol_doc > docs/protocol.md`. "
        "Do not edit by hand: a test fails when this page differs from the schemas. -->",
        "",
        "This page is for engineers connecting Linesight to a MES, SCADA or historian. Every "
        "station and the fleet controller speak JSON over MQTT (3.1.1 or 5) on the topics "
        "below. The root `linesight/v1` is the default and can be changed per site (`topic_prefix` "
        "in every station's and the controller's configuration, and in the broker's ACL); "
        "`{station}` is a station id (letters, digits, `_`, `.`, `-`, starting with a letter or "
        "digit; at most 64). Every "
        "number is finite: a message carrying NaN or an infinity (`NaN`, `Infinity`, `1e999`) "
        "is invalid, as is a `ts` that falls outside the years 1 to 9999 in UTC, and a string "
        "holding a lone UTF-16 surrogate (`\\ud800` without its pair: no UTF-8 text can hold "
        "it). Payloads are parsed strictly: every field must have the JSON type its schema "
        "gives (a string such as `\"9\"` or `true` is not a number, a number is not a string, "
        "and `1.0` is not an integer, while an integer is a valid number).",
        "",
        "## Topics",
        "",
        "| topic | message | QoS | retained | from → to |",
        "|---|---|---|---|---|",
    ]
    direction = {
        "Command": "controller → station",
        "Receipt": "controller → station",
        "RolloutStatus": "controller → all",
    }
    for message in examples():
        name = type(message).__name__
        delivery = p.delivery_for(message)
        lines.append(
            f"| `{_topic_of(message, topics)}` | [{name}](#{name.lower()}) | {delivery.qos} | "
            f"{'yes' if delivery.retain else 'no'} | "
            f"{direction.get(name, 'station → controller')} |"
        )
    trigger = topics.trigger("{station}")
    lines += [
        f"| `{trigger}` | a part trigger: `{{\"part_id\": \"...\"}}` or an empty payload "
        "([sources.md](sources.md#part-trigger)) | 0 or 1 | no | PLC gateway → station |",
        "",
        "## Every message",
        "",
        "| field | meaning |",
        "|---|---|",
        "| `schema` | always `\"linesight/v1\"`; a consumer must refuse any other value |",
        "| `msg_id` | a UUID, unique per message; a message delivered again keeps its `msg_id` |",
        "| `station` | the station the message is from or about (`fleet` for fleet-wide) |",
        "| `seq` | the sender's sequence number, monotonic across restarts. Decisions, shadow "
        "results, verdicts and acks of one station use consecutive numbers, so a gap means "
        "something is still on its way; state and metrics carry the latest such number "
        "without taking a new one |",
        "| `ts` | when the message was made, UTC, ISO 8601 |",
        "| `stream` | decisions, shadow results, verdicts, acks and the station's state: the "
        "station's seq stream, a UUID made with the station's store. A station whose storage "
        "was replaced (a new disk, a wiped `data_dir`) starts a new stream at `seq` 0 under "
        "the same station id. Absent from stations whose store was numbering messages before "
        "this field existed; absent means no key at all, never `null`, so consumers built "
        "before the field still parse the message |",
        "",
        "Delivery is at least once: after a reconnect a station publishes again what the "
        "controller has not yet receipted, with the same `msg_id` and `seq` (a message still "
        "waiting for its PUBACK goes again as the MQTT client's own retransmission, once, not "
        "as a further copy). A copy has the "
        "same `msg_id`: dedupe by `(station, stream, seq, msg_id)` or by `msg_id`. A station "
        "whose store was restored from a backup gives out seqs it had used again, in the same "
        "stream, for other messages; keyed by `(station, stream, seq)` alone, those would be "
        "taken for copies and lost.",
        "",
    ]
    for message in examples():
        message_type = type(message)
        name = message_type.__name__
        schema = json.dumps(p.json_schema(message_type), indent=2, sort_keys=True)
        example = json.dumps(message.model_dump(mode="json", by_alias=True), indent=2)
        lines += [
            f"## {name}",
            "",
            _PURPOSE[name],
            "",
            f"Topic `{_topic_of(message, topics)}`.",
            "",
            "Example:",
            "",
            "```json",
            example,
            "```",
            "",
            "<details><summary>JSON Schema</summary>",
            "",
            "```json",
            schema,
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
