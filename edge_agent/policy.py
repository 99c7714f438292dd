"""What happens to a part: pure decision logic, no I/O.

The loop asks two questions per part. Before inference: which model decides (`decider_for`).
After it: what the station does with the part (`decide`). Both are pure, so every degree of
automation and every deployment mode is tested without a model, a camera or a broker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from linesight.protocol import Action, AutomationLevel, DecidedBy, DeploymentMode, ReviewReason

Slot = Literal["active", "candidate"]


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """One model's opinion on one part; `error` set (and label None) when the model failed."""

    label: str | None
    confidence: float | None
    latency_ms: float
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.label is None or self.confidence is None


@dataclass(frozen=True, slots=True)
class PartDecision:
    action: Action
    decided_by: DecidedBy
    review_reason: ReviewReason | None
    suggestion: str | None
    shows_model: bool
    """Whether the deciding model's label belongs in the Decision (not under human_only)."""
    audit: bool = False
    """Auto-decided, and also queued for an operator's label (unbiased accuracy estimates)."""


def unit_hash(part_id: str, salt: str) -> float:
    """A stable, uniform number in [0, 1) from a part id: the same part, the same draw, always."""
    digest = hashlib.blake2b(f"{salt}:{part_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def decider_for(
    part_id: str,
    mode: DeploymentMode,
    canary_fraction: float,
    serving: Slot,
    has_candidate: bool,
) -> Slot:
    """The slot whose model decides this part."""
    if not has_candidate:
        return "active"
    if mode == DeploymentMode.CANARY:
        return "candidate" if unit_hash(part_id, "canary") < canary_fraction else "active"
    if mode == DeploymentMode.BLUE_GREEN:
        return serving
    return "active"


def decide(
    part_id: str,
    automation: AutomationLevel,
    decider: Slot,
    output: ModelOutput,
    thresholds: Mapping[str, float],
    defect_label: str,
    audit_fraction: float,
) -> PartDecision:
    """Pass, reject or review, given the deciding model's output and the automation level.

    A failed model never passes a part: the part is held for review with decided_by=failsafe.
    """
    model_decider = DecidedBy.ACTIVE if decider == "active" else DecidedBy.CANDIDATE
    label, confidence = output.label, output.confidence
    if output.error is not None or label is None or confidence is None:
        # At every level, human_only included: the record says the model failed on this part.
        return PartDecision(Action.REVIEW, DecidedBy.FAILSAFE, ReviewReason.FAILSAFE, None, False)
    if automation == AutomationLevel.HUMAN_ONLY:
        return PartDecision(Action.REVIEW, DecidedBy.OPERATOR, ReviewReason.HUMAN_ONLY, None, False)
    if automation == AutomationLevel.SHADOW:
        return PartDecision(
            Action.REVIEW, DecidedBy.OPERATOR, ReviewReason.OPERATOR_DECIDES, None, True
        )
    if automation == AutomationLevel.ASSIST:
        return PartDecision(
            Action.REVIEW, DecidedBy.OPERATOR, ReviewReason.OPERATOR_DECIDES, label, True
        )
    if automation == AutomationLevel.PARTIAL:
        # A label with no threshold is never the model's to decide: a saturated softmax gives
        # exactly 1.0, which a default of 1.0 would let through.
        threshold = thresholds.get(label)
        if threshold is None or confidence < threshold:
            return PartDecision(
                Action.REVIEW, DecidedBy.OPERATOR, ReviewReason.LOW_CONFIDENCE, label, True
            )
    action = Action.REJECT if label == defect_label else Action.PASS
    audit = unit_hash(part_id, "audit") < audit_fraction
    return PartDecision(
        action,
        model_decider,
        ReviewReason.AUDIT if audit else None,
        label,
        True,
        audit=audit,
    )


def agree(first: ModelOutput, second: ModelOutput) -> bool:
    return not first.failed and not second.failed and first.label == second.label
