"""The MQTT contract, v1: the one place where topic strings and payload schemas exist.

Every message is JSON validated strictly by a pydantic model below: each field must have the
JSON type its schema gives (no number from a string, no number from true or false). Every
message carries the envelope `schema`, `msg_id`, `station`, `seq` and `ts`; a station's
durable messages and state also name its seq `stream`. Parsing never raises anything but
`ProtocolError`, which names the offending field.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA: Literal["linesight/v1"] = "linesight/v1"
DEFAULT_PREFIX = "linesight/v1"
STATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CONTROLLER_ID = "fleet"
"""The `station` field of messages the fleet controller sends about the fleet as a whole."""

StationId = Annotated[str, Field(pattern=STATION_ID_PATTERN, description="station identifier")]
PART_ID_MAX_LENGTH = 128
SEQ_MAX = 2**63 - 1  # what SQLite's INTEGER holds, on stations and at the controller
PartId = Annotated[
    str, Field(min_length=1, max_length=PART_ID_MAX_LENGTH, description="part identifier")
]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Label = Annotated[str, Field(min_length=1, max_length=64)]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class ProtocolError(ValueError):
    """A payload that is not a valid v1 message; `field` names where it went wrong."""

    def __init__(self, message_type: str, field: str, reason: str) -> None:
        # Clipped: the field path and the reason come from the payload (an unknown key of any
        # length), and the text goes into an ack or a log line.
        super().__init__(f"invalid {message_type}: {_clip(field, 200)}: {_clip(reason, 1000)}")
        self.message_type = message_type
        self.field = field
        self.reason = reason


class AutomationLevel(StrEnum):
    """How much a station's model decides on its own."""

    HUMAN_ONLY = "human_only"
    SHADOW = "shadow"
    ASSIST = "assist"
    PARTIAL = "partial"
    FULL = "full"


class DeploymentMode(StrEnum):
    """How the candidate model runs beside the active one."""

    NONE = "none"
    SHADOW = "shadow"
    CANARY = "canary"
    BLUE_GREEN = "blue_green"


class Action(StrEnum):
    PASS = "pass"  # noqa: S105 - a part outcome, not a password
    REJECT = "reject"
    REVIEW = "review"


class DecidedBy(StrEnum):
    ACTIVE = "active"
    CANDIDATE = "candidate"
    OPERATOR = "operator"
    FAILSAFE = "failsafe"


class ReviewReason(StrEnum):
    """Why a part went to the operator's review queue."""

    HUMAN_ONLY = "human_only"
    OPERATOR_DECIDES = "operator_decides"
    LOW_CONFIDENCE = "low_confidence"
    AUDIT = "audit"
    DISAGREEMENT = "disagreement"
    FAILSAFE = "failsafe"


class VerdictOutcome(StrEnum):
    PASS = "pass"  # noqa: S105 - a part outcome, not a password
    REJECT = "reject"
    ESCALATE = "escalate"


def _absent(value: object) -> bool:
    """Optional fields added to v1 are left out of the JSON when unset, so a peer built before
    them (which forbids unknown keys) still parses the message."""
    return value is None


class Strict(BaseModel):
    # No inf or nan anywhere: JSON has no such numbers (Python writes them as bare words that
    # other parsers refuse, and a store that keeps the document writes them back as null).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(Strict):
    """Which model: name, semantic version, and the sha256 of its signed manifest."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Envelope(Strict):
    """Fields every v1 message carries."""

    kind: ClassVar[str] = "message"
    schema_: Literal["linesight/v1"] = Field(
        default=SCHEMA, alias="schema", description="contract version; always 'linesight/v1'"
    )
    msg_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="unique per message")
    station: StationId = Field(
        description="the station the message is from or about ('fleet' for fleet-wide messages)"
    )
    seq: int = Field(
        ge=0, le=SEQ_MAX, description="per-sender sequence number; monotonic across restarts"
    )
    stream: uuid.UUID | None = Field(
        default=None,
        exclude_if=_absent,
        description="the sender's seq stream: a station whose storage was replaced starts a "
        "new stream at seq 0; absent (no key at all) from senders that keep no store or "
        "started before streams existed",
    )
    ts: AwareDatetime = Field(
        default_factory=lambda: datetime.now(UTC), description="when it was made (UTC)"
    )

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        try:
            return value.astimezone(UTC)
        except OverflowError as exc:  # e.g. 9999-12-31T23:00:00-05:00
            raise ValueError("outside the years 1 to 9999 once converted to UTC") from exc

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


# --- station -> controller ----------------------------------------------------------------


class Fault(Strict):
    code: str = Field(
        min_length=1, max_length=64,
        description="e.g. active_load, candidate_inference, outbox_full, source: the table in "
        "docs/agent.md lists them",
    )
    message: str = Field(max_length=2000)
    model: ModelRef | None = None
    since: AwareDatetime


class DriftSignal(Strict):
    """Population stability index of this window against the reference taken at promotion."""

    psi_brightness: float = Field(ge=0)
    psi_contrast: float = Field(ge=0)
    psi_sharpness: float = Field(ge=0)
    psi_confidence: float = Field(ge=0)
    window_parts: int = Field(ge=0)
    drifting: bool


class StationState(Envelope):
    """Retained; the Last Will publishes the same with online=false."""

    kind: ClassVar[str] = "state"
    online: bool
    active: ModelRef | None = None
    candidate: ModelRef | None = None
    previous: ModelRef | None = Field(default=None, description="kept for rollback")
    mode: DeploymentMode = DeploymentMode.NONE
    automation: AutomationLevel = AutomationLevel.HUMAN_ONLY
    automation_note: str = Field(
        default="", max_length=600, description="who last changed the automation level, and why"
    )
    canary_fraction: Probability = 0.0
    serving: Literal["active", "candidate"] = Field(
        default="active", description="blue_green: which slot decides parts now"
    )
    faults: list[Fault] = Field(default_factory=list)
    outbox_depth: int = Field(default=0, ge=0)
    receipted_upto: int | None = Field(
        default=None,
        ge=-1,
        le=SEQ_MAX,
        exclude_if=_absent,
        description="the highest seq of this station's seq stream (`stream`) that a controller "
        "receipted and the outbox deleted: nothing at or below it will be sent again; a "
        "controller whose store lost those messages continues the stream's watermark from here",
    )
    review_queue_depth: int = Field(default=0, ge=0)
    unconfirmed_dropped: int = Field(
        default=0, ge=0, description="review images that the disk quota forced out unconfirmed"
    )
    drift: DriftSignal | None = None
    parts_inspected: int = Field(default=0, ge=0)
    labels: dict[str, str] = Field(default_factory=dict, description="station labels, e.g. line")
    agent_version: str = ""


class Decision(Envelope):
    """One per inspected part: what the station did with it and who decided."""

    kind: ClassVar[str] = "decision"
    part_id: PartId
    decided_by: DecidedBy
    label: Label | None = Field(description="the deciding model's label; null when none decided")
    confidence: Probability | None = None
    action: Action
    review_reason: ReviewReason | None = None
    model: ModelRef | None = Field(description="the model whose output drove the decision")
    latency_ms: float = Field(ge=0, allow_inf_nan=False)
    automation: AutomationLevel
    mode: DeploymentMode
    suggestion: Label | None = Field(
        default=None, description="the model's label shown to the operator (assist and above)"
    )

    @model_validator(mode="after")
    def _coherent(self) -> Decision:
        if self.action == Action.REVIEW and self.review_reason is None:
            raise ValueError("review_reason is required when action is review")
        if self.decided_by == DecidedBy.FAILSAFE and self.action == Action.PASS:
            raise ValueError("a fail-safe decision never passes a part")
        if self.decided_by in (DecidedBy.ACTIVE, DecidedBy.CANDIDATE) and self.model is None:
            raise ValueError("model is required when a model decided")
        return self


class ModelOpinion(Strict):
    model: ModelRef
    label: Label | None = Field(description="null when the model failed on this part")
    confidence: Probability | None = None
    latency_ms: float = Field(ge=0, allow_inf_nan=False)
    error: str | None = Field(default=None, max_length=2000)


class ShadowResult(Envelope):
    """One per part both models judged."""

    kind: ClassVar[str] = "shadow"
    part_id: PartId
    mode: DeploymentMode
    active: ModelOpinion
    candidate: ModelOpinion
    agree: bool

    @model_validator(mode="after")
    def _agreement(self) -> ShadowResult:
        both = self.active.label is not None and self.candidate.label is not None
        if self.agree and not (both and self.active.label == self.candidate.label):
            raise ValueError("agree is true but the labels differ or one is missing")
        if not self.agree and both and self.active.label == self.candidate.label:
            raise ValueError("agree is false but the labels are equal")
        return self


class Verdict(Envelope):
    """An operator's judgement of a part: the ground truth for the gates. An escalated part
    gets a second, labelled Verdict from the supervisor; the latest labelled one counts."""

    kind: ClassVar[str] = "verdict"
    part_id: PartId
    operator: str = Field(min_length=1, max_length=64, description="who gave the verdict")
    outcome: VerdictOutcome
    label: Label | None = Field(description="the true label; null when escalated")
    review_reason: ReviewReason
    model_label: Label | None = None
    candidate_label: Label | None = None
    decided_at: AwareDatetime


class LatencySummary(Strict):
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    count: int = Field(ge=0)


class StationMetrics(Envelope):
    """Periodic (QoS 0) counters over the last window."""

    kind: ClassVar[str] = "metrics"
    window_s: float = Field(gt=0)
    parts: int = Field(ge=0)
    parts_missed: int | None = Field(
        default=None,
        ge=0,
        exclude_if=_absent,
        description="parts the station did not inspect in the window: PLC triggers that got no "
        "camera frame (camera down, or the frame let go to keep within held_frames_mb), folder "
        "images and video frames that do not decode; absent when the source cannot miss parts "
        "(synthetic) and from stations built before this field",
    )
    actions: dict[Action, int] = Field(default_factory=dict)
    decided_by: dict[DecidedBy, int] = Field(default_factory=dict)
    shadow_pairs: int = Field(default=0, ge=0)
    agreement_rate: Probability | None = None
    candidate_skipped: int = Field(default=0, ge=0)
    latency: dict[Literal["active", "candidate"], LatencySummary] = Field(default_factory=dict)
    faults: int = Field(default=0, ge=0)
    outbox_depth: int = Field(default=0, ge=0)
    review_queue_depth: int = Field(default=0, ge=0)
    drift: DriftSignal | None = None


NIL_CMD_ID = uuid.UUID(int=0)
"""The cmd_id of an ack for a command the station could not authenticate (or read): a forged
command must not answer for a real one. Its error names the cmd_id the command claimed."""


class CommandAck(Envelope):
    kind: ClassVar[str] = "ack"
    cmd_id: uuid.UUID = Field(
        description="the command's cmd_id; the nil UUID for a command the station could not "
        "authenticate or read (the error names the cmd_id it claimed)"
    )
    command: str = Field(description="the command's name, or 'unknown' when unreadable")
    ok: bool
    error: str | None = Field(default=None, max_length=4000)
    state_after: StationState | None = None


# --- controller -> station ----------------------------------------------------------------


class DeployCandidate(Strict):
    name: Literal["deploy_candidate"] = "deploy_candidate"
    url: str = Field(pattern=r"^https?://", description="bundle folder URL")
    model: ModelRef = Field(description="sha256 is the digest of the bundle's manifest.json")
    signature: str = Field(min_length=1, description="base64 Ed25519 signature of manifest.json")
    mode: DeploymentMode = DeploymentMode.SHADOW
    canary_fraction: Probability = 0.0


class SetMode(Strict):
    name: Literal["set_mode"] = "set_mode"
    mode: DeploymentMode
    canary_fraction: Probability = 0.0


class SetAutomation(Strict):
    name: Literal["set_automation"] = "set_automation"
    automation: AutomationLevel
    reason: str = Field(default="", max_length=500)


class Promote(Strict):
    name: Literal["promote"] = "promote"
    expect: ModelRef | None = Field(
        default=None, description="refuse unless this is the candidate being promoted"
    )


class Rollback(Strict):
    name: Literal["rollback"] = "rollback"
    reason: str = Field(default="", max_length=500)


class Switch(Strict):
    name: Literal["switch"] = "switch"
    to: Literal["active", "candidate"]


CommandBody = Annotated[
    DeployCandidate | SetMode | SetAutomation | Promote | Rollback | Switch,
    Field(discriminator="name"),
]


class Command(Envelope):
    """Controller to station. `station` is the target; `seq` is the controller's sequence."""

    kind: ClassVar[str] = "cmd"
    cmd_id: uuid.UUID = Field(description="idempotency key: a repeated cmd_id is acked, not redone")
    body: CommandBody
    rollout_id: str | None = Field(default=None, max_length=64)
    expires_at: AwareDatetime | None = Field(
        default=None, description="a station refuses the command after this time"
    )
    signature: str | None = Field(
        default=None,
        description="base64 Ed25519 signature by the controller's command key over the "
        "command's canonical JSON without this field; required by stations that hold the key",
    )


class Receipt(Envelope):
    """Controller to station: everything up to `upto_seq` is stored; the outbox may drop it."""

    kind: ClassVar[str] = "receipt"
    upto_seq: int = Field(
        ge=-1, le=SEQ_MAX, description="highest contiguous seq stored; -1 when none"
    )
    upto_stream: uuid.UUID | None = Field(
        default=None,
        exclude_if=_absent,
        description="the station's seq stream that upto_seq counts in (absent: the station's "
        "messages carried no stream); a station applies only receipts for its own stream",
    )


class StageStatus(Strict):
    index: int = Field(ge=0)
    name: str
    mode: str
    stations: list[StationId]
    status: Literal["pending", "running", "waiting_approval", "passed", "failed", "skipped"]
    gate: str | None = Field(default=None, description="the gate's last verdict and why")


class RolloutStatus(Envelope):
    """Retained on the fleet topic: the current (or last) rollout."""

    kind: ClassVar[str] = "rollout"
    rollout_id: str = Field(min_length=1, max_length=64)
    plan: str
    candidate: ModelRef
    phase: Literal[
        "pending", "running", "waiting_approval", "paused", "promoted", "rolled_back", "aborted"
    ]
    stage: int = Field(ge=0)
    stages: list[StageStatus]
    reason: str = ""
    touched: list[StationId] = Field(default_factory=list)


MESSAGE_TYPES: tuple[type[Envelope], ...] = (
    StationState,
    Decision,
    ShadowResult,
    Verdict,
    StationMetrics,
    Command,
    CommandAck,
    Receipt,
    RolloutStatus,
)
M = TypeVar("M", bound=Envelope)


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(root)"


# Half of a UTF-16 pair: JSON may escape one alone (\ud800), and json.loads takes one encoded
# alone in bytes; no UTF-8 text can hold it, so it could be neither stored nor sent on.
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAY_HOLD_SURROGATE = re.compile(rb"\\[uU][dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _surrogate_path(document: dict[str, Any]) -> str | None:
    """The path of the first key or string in `document` that holds a lone surrogate."""
    pending: list[tuple[str, object]] = [("", document)]
    while pending:  # not recursive: json.loads nests deeper than this stack may go
        path, value = pending.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "(root)"
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return _SURROGATE.sub("?", where)
                pending.append((where, item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{index}", item) for index, item in enumerate(value))
    return None


def parse(message_type: type[M], payload: bytes | str) -> M:
    """Validate a payload as `message_type`; any problem is a ProtocolError naming the field."""
    name = message_type.__name__
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON, not UTF-8, or an integer of more than 4,300 digits;
        # RecursionError: nesting deeper than the interpreter's stack.
        raise ProtocolError(name, "(payload)", f"not JSON: {str(exc)[:200]}") from exc
    if not isinstance(document, dict):
        raise ProtocolError(name, "(payload)", "a JSON object is required")
    text = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    if _MAY_HOLD_SURROGATE.search(text):
        where = _surrogate_path(document)
        if where is not None:
            raise ProtocolError(name, where, "a lone UTF-16 surrogate, which no text may hold")
    version = document.get("schema")
    if version != SCHEMA:
        raise ProtocolError(name, "schema", f"unsupported schema {version!r}; expected {SCHEMA!r}")
    try:
        # Strict, from the JSON text: each field must have its schema's JSON type ("9" or true
        # is no integer, 1.0 no integer either; an integer is a float). Strings still give
        # timestamps, UUIDs and enum values, which JSON has no other form for. From the
        # json.loads document instead, strict mode would refuse those strings too.
        return message_type.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        raise _refusal(name, exc) from exc


def _refusal(message_type: str, exc: ValidationError) -> ProtocolError:
    """The first of a validation's errors, naming its field and, for a wrong type, what the
    payload held there."""
    first = exc.errors()[0]
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "json_invalid":
        # Read by json.loads above, but past what the validator reads (e.g. nested too deep).
        return ProtocolError(message_type, "(payload)", f"not readable: {first['msg']}")
    reason = first["msg"]
    if first["type"].endswith("_type") or first["type"] == "enum":
        reason += f" (got {_clip(_json_text(first['input']), 60)})"
    return ProtocolError(message_type, _field_path(first["loc"]), reason + more)


def _json_text(value: object) -> str:
    """`value` as the payload wrote it (a string quoted, true/false/null as JSON spells them);
    an object or an array only by its kind, which is cheap however large it is."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        value = value[:61]  # the caller clips to 60: a long string is not copied whole
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # cannot happen for what JSON parsing gives; never raise
        return repr(value)


# --- topics ---------------------------------------------------------------------------------


class Channel(StrEnum):
    STATE = "state"
    DECISION = "decision"
    SHADOW = "shadow"
    VERDICT = "verdict"
    METRICS = "metrics"
    CMD = "cmd"
    ACK = "ack"
    RECEIPT = "receipt"


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a channel is published: QoS, retain, and whether it goes through the durable outbox."""

    qos: int
    retain: bool
    durable: bool


DELIVERY: dict[Channel, Delivery] = {
    Channel.STATE: Delivery(qos=1, retain=True, durable=False),
    Channel.DECISION: Delivery(qos=1, retain=False, durable=True),
    Channel.SHADOW: Delivery(qos=1, retain=False, durable=True),
    Channel.VERDICT: Delivery(qos=1, retain=False, durable=True),
    Channel.METRICS: Delivery(qos=0, retain=False, durable=False),
    Channel.CMD: Delivery(qos=1, retain=False, durable=False),
    Channel.ACK: Delivery(qos=1, retain=False, durable=True),
    Channel.RECEIPT: Delivery(qos=1, retain=False, durable=False),
}
ROLLOUT_DELIVERY = Delivery(qos=1, retain=True, durable=False)

CHANNEL_TYPES: dict[Channel, type[Envelope]] = {
    Channel.STATE: StationState,
    Channel.DECISION: Decision,
    Channel.SHADOW: ShadowResult,
    Channel.VERDICT: Verdict,
    Channel.METRICS: StationMetrics,
    Channel.CMD: Command,
    Channel.ACK: CommandAck,
    Channel.RECEIPT: Receipt,
}
CHANNEL_OF: dict[type[Envelope], Channel] = {kind: ch for ch, kind in CHANNEL_TYPES.items()}

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True, slots=True)
class StationTopic:
    station: str
    channel: Channel


class Topics:
    """Topic builders under a configurable prefix (default `linesight/v1`)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not _PREFIX.match(prefix):
            raise ValueError(
                f"topic prefix {prefix!r} must be '/'-separated words without wildcards"
            )
        self.prefix = prefix

    def station(self, station: str, channel: Channel) -> str:
        if not re.match(STATION_ID_PATTERN, station):
            raise ValueError(f"station id {station!r} does not match {STATION_ID_PATTERN}")
        return f"{self.prefix}/stations/{station}/{channel.value}"

    def every_station(self, channel: Channel) -> str:
        """Subscription filter for one channel of every station."""
        return f"{self.prefix}/stations/+/{channel.value}"

    def rollout(self) -> str:
        return f"{self.prefix}/fleet/rollout"

    def trigger(self, station: str) -> str:
        """Where a PLC gateway announces a part in front of a live camera."""
        return f"{self.prefix}/stations/{station}/trigger"

    def parse_station_topic(self, topic: str) -> StationTopic:
        head = f"{self.prefix}/stations/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under {head}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2:
            raise ValueError(f"topic {topic!r} is not {head}<station>/<channel>")
        station, channel = parts
        try:
            return StationTopic(station, Channel(channel))
        except ValueError as exc:
            raise ValueError(f"topic {topic!r} names an unknown channel {channel!r}") from exc

    def topic_for(self, message: Envelope) -> str:
        if isinstance(message, RolloutStatus):
            return self.rollout()
        return self.station(message.station, CHANNEL_OF[type(message)])


def delivery_for(message: Envelope) -> Delivery:
    if isinstance(message, RolloutStatus):
        return ROLLOUT_DELIVERY
    return DELIVERY[CHANNEL_OF[type(message)]]


def parse_station_message(channel: Channel, payload: bytes | str) -> Envelope:
    return parse(CHANNEL_TYPES[channel], payload)


def json_schema(message_type: type[Envelope]) -> dict[str, Any]:
    return message_type.model_json_schema(by_alias=True)


COMMAND_BODY_ADAPTER: TypeAdapter[Any] = TypeAdapter(CommandBody)
