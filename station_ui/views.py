"""What the screens show, computed from store rows without any I/O: queue items, banners, shift."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from edge_agent.store import ReviewRow
from linesight.protocol import AutomationLevel, ReviewReason

REASON_TEXT: dict[str, tuple[str, str]] = {
    ReviewReason.LOW_CONFIDENCE.value: ("Low confidence", "The model is unsure about this part."),
    ReviewReason.DISAGREEMENT.value: (
        "Disagreement",
        "The running model and the model on trial judged this part differently.",
    ),
    ReviewReason.AUDIT.value: (
        "Audit",
        "A random check of a part the model decided on its own.",
    ),
    ReviewReason.FAILSAFE.value: (
        "Fail-safe",
        "The model could not judge this part; it was held for you.",
    ),
    ReviewReason.HUMAN_ONLY.value: ("Human only", "Every part on this station is judged by you."),
    ReviewReason.OPERATOR_DECIDES.value: (
        "Operator decides",
        "The model suggests; you decide every part at this automation level.",
    ),
}

AUTOMATION_TEXT: dict[str, str] = {
    AutomationLevel.HUMAN_ONLY.value: "Human only: operators judge every part",
    AutomationLevel.SHADOW.value: "Shadow: the model runs silently, operators judge every part",
    AutomationLevel.ASSIST.value: "Assist: the model suggests, operators judge every part",
    AutomationLevel.PARTIAL.value: "Partial: the model decides when sure, else operators do",
    AutomationLevel.FULL.value: "Full: the model decides; audits still reach operators",
}

# At these levels the operator judges without seeing the model's opinion, so it cannot anchor
# them: in shadow the model is being measured against the operator, in human_only it is not used.
SUGGESTION_HIDDEN = frozenset({AutomationLevel.SHADOW.value, AutomationLevel.HUMAN_ONLY.value})
# These verdicts grade the models themselves (an audit samples the model's own decisions; a
# disagreement is what the rollout gate counts), so showing one model's answer would bias them.
BLIND_REASONS = frozenset({ReviewReason.AUDIT.value, ReviewReason.DISAGREEMENT.value})


@dataclass(frozen=True, slots=True)
class QueueItem:
    part_id: str
    created: datetime
    reason: str
    reason_title: str
    reason_text: str
    automation: str
    suggestion: str | None
    """None when hidden at this automation level or when the model gave none."""
    confidence: float | None
    has_image: bool

    @property
    def confidence_percent(self) -> str | None:
        return None if self.confidence is None else f"{self.confidence * 100:.0f} %"

    def to_json(self, local_time: str) -> dict[str, Any]:
        return {
            "part_id": self.part_id,
            "created": self.created.isoformat(),
            "time": local_time,
            "reason": self.reason,
            "reason_title": self.reason_title,
            "automation": self.automation,
            "suggestion": self.suggestion,
            "confidence": self.confidence,
        }


def queue_item(row: ReviewRow) -> QueueItem:
    title, text = REASON_TEXT.get(row.reason, (row.reason, ""))
    hidden = row.automation in SUGGESTION_HIDDEN or row.reason in BLIND_REASONS
    return QueueItem(
        part_id=row.part_id,
        created=row.created,
        reason=row.reason,
        reason_title=title,
        reason_text=text,
        automation=row.automation,
        suggestion=None if hidden else row.suggestion,
        confidence=None if hidden or row.suggestion is None else row.confidence,
        has_image=row.image_path is not None,
    )


@dataclass(frozen=True, slots=True)
class Banner:
    kind: str
    """Stable name for tests and styling: agent_down, broker_offline, outbox, fault, rollout."""
    severity: str
    """alarm (red), warn (amber) or info (blue)."""
    text: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "severity": self.severity, "text": self.text}


_MODEL_FAULTS = ("active_", "candidate_")  # a model that failed to load or to judge a part
_ADVISORY_FAULTS = frozenset({"disk_low", "broker_cert_expiring"})  # a warning, not a failure


def _codes(faults: list[dict[str, Any]]) -> str:
    return ", ".join(str(f.get("code", "?")) for f in faults)


def _said(fault: dict[str, Any]) -> str:
    return str(fault.get("message", "")).rstrip(". ")


def _model_name(ref: Any) -> str:
    if isinstance(ref, dict):
        return f"{ref.get('name', '?')} {ref.get('version', '?')}"
    return "a new model"


def banners(
    status: tuple[dict[str, Any], datetime] | None,
    now: datetime,
    *,
    stale_after_s: float,
    outbox_warn: int,
    age_s: float | None = None,
) -> list[Banner]:
    """The warnings the operator must see, most serious first. `age_s` is the snapshot's age
    as measured by the screen (station_ui.clock.SnapshotAge); without it, by `now`."""
    if status is None:
        return [Banner("agent_down", "alarm", "Inspection agent has not started: no parts are "
                       "being inspected on this station.")]
    document, written = status
    shown: list[Banner] = []
    age = (now - written).total_seconds() if age_s is None else age_s
    if age > stale_after_s:
        shown.append(Banner(
            "agent_down", "alarm",
            f"Inspection agent not running: no news for {_age_text(age)}. "
            "Parts are not being inspected. Call the line supervisor.",
        ))
    elif not document.get("broker_connected", False):
        shown.append(Banner(
            "broker_offline", "warn",
            "Station offline from the plant network. Keep judging: verdicts are kept on this "
            "station and sent when it is back.",
        ))
    faults = document.get("faults") or []
    if isinstance(faults, list):
        listed = [f for f in faults if isinstance(f, dict)]
        model = [f for f in listed if str(f.get("code", "")).startswith(_MODEL_FAULTS)]
        station = [f for f in listed if f not in model]
        if model:
            shown.append(Banner(
                "fault", "alarm",
                f"Model fault ({_codes(model)}): {_said(model[0])}. Held parts come to this "
                "queue.",
            ))
        if station:
            # A full disk or a refused broker is no model fault, and no reason to hold parts.
            advisory = all(f.get("code") in _ADVISORY_FAULTS for f in station)
            shown.append(Banner(
                "station_fault", "warn" if advisory else "alarm",
                f"Station fault ({_codes(station)}): {_said(station[0])}. Tell maintenance.",
            ))
    depth = document.get("outbox_depth", 0)
    if isinstance(depth, int) and depth > outbox_warn:
        shown.append(Banner(
            "outbox", "warn",
            f"{depth} messages waiting to be sent to the plant. They are safe on this "
            "station; tell maintenance if this keeps growing.",
        ))
    candidate = document.get("candidate")
    if document.get("rollout_active") or candidate:
        mode = str(document.get("mode", "")).replace("_", " ")
        shown.append(Banner(
            "rollout", "info",
            f"Model trial under way on this station: {_model_name(candidate)} ({mode}). "
            "Your verdicts decide whether it is kept.",
        ))
    return shown


def _age_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def shift_start(now: datetime, anchor_hour: int, shift_hours: int) -> datetime:
    """Start of the shift containing `now`, in the station's local time; shifts start on the
    wall clock at `anchor_hour` and every `shift_hours` after it, so 6 and 8 give 06:00, 14:00
    and 22:00, also across the night the clocks change for daylight saving time."""
    # Wall-clock arithmetic on naive local time; `astimezone()` of a naive time then applies
    # the UTC offset in force at that moment, not the one in force now.
    wall = now.astimezone().replace(tzinfo=None)
    anchor = wall.replace(hour=anchor_hour, minute=0, second=0, microsecond=0)
    if anchor > wall:
        anchor -= timedelta(days=1)
    length = timedelta(hours=shift_hours)
    return (anchor + length * ((wall - anchor) // length)).astimezone()


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def verdict_labels(status: dict[str, Any] | None, ok: str, defect: str) -> tuple[str, str]:
    """The labels a Pass and a Reject carry: the running model's own (`model_labels` in the
    agent's status snapshot), else the configured ones. A malformed snapshot never wins."""
    labels = (status or {}).get("model_labels")
    if isinstance(labels, dict):
        found = labels.get("ok"), labels.get("defect")
        if all(isinstance(label, str) and 1 <= len(label) <= 64 for label in found) and (
            found[0] != found[1]
        ):
            return str(found[0]), str(found[1])
    return ok, defect
