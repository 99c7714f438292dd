"""Decision policy: every degree of automation and deployment mode, without a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.policy import ModelOutput, agree, decide, decider_for, unit_hash
from linesight.protocol import Action, AutomationLevel, DecidedBy, DeploymentMode, ReviewReason

THRESHOLDS = {"ok": 0.8, "defect": 0.6}
SURE_DEFECT = ModelOutput("defect", 0.99, 2.0)
SURE_OK = ModelOutput("ok", 0.99, 2.0)
UNSURE_OK = ModelOutput("ok", 0.55, 2.0)
FAILED = ModelOutput(None, None, 2.0, error="output contains NaN")


def test_human_only_decides_nothing() -> None:
    for output in (SURE_OK, SURE_DEFECT):
        decision = decide(
            "p", AutomationLevel.HUMAN_ONLY, "active", output, THRESHOLDS, "defect", 0
        )
        assert decision.action == Action.REVIEW
        assert decision.decided_by == DecidedBy.OPERATOR
        assert decision.review_reason == ReviewReason.HUMAN_ONLY
        assert decision.suggestion is None and not decision.shows_model


def test_shadow_hides_the_model_and_assist_shows_it() -> None:
    hidden = decide("p", AutomationLevel.SHADOW, "active", SURE_DEFECT, THRESHOLDS, "defect", 0)
    shown = decide("p", AutomationLevel.ASSIST, "active", SURE_DEFECT, THRESHOLDS, "defect", 0)
    for decision in (hidden, shown):
        assert decision.action == Action.REVIEW and decision.decided_by == DecidedBy.OPERATOR
    assert hidden.suggestion is None and hidden.shows_model
    assert shown.suggestion == "defect"


def test_partial_decides_only_above_the_class_threshold() -> None:
    sure = decide("p", AutomationLevel.PARTIAL, "active", SURE_OK, THRESHOLDS, "defect", 0)
    unsure = decide("p", AutomationLevel.PARTIAL, "active", UNSURE_OK, THRESHOLDS, "defect", 0)
    defect = decide(
        "p", AutomationLevel.PARTIAL, "active", ModelOutput("defect", 0.65, 1), THRESHOLDS,
        "defect", 0,
    )
    assert sure.action == Action.PASS and sure.decided_by == DecidedBy.ACTIVE
    assert unsure.action == Action.REVIEW and unsure.review_reason == ReviewReason.LOW_CONFIDENCE
    assert unsure.suggestion == "ok"
    assert defect.action == Action.REJECT  # 0.65 clears the defect threshold of 0.6


def test_partial_never_decides_a_label_that_has_no_threshold() -> None:
    # A saturated softmax gives exactly 1.0: without a threshold the part is the operator's.
    certain_ok = ModelOutput("ok", 1.0, 1.0)
    only_defect = {"defect": 0.6}
    decision = decide("p", AutomationLevel.PARTIAL, "active", certain_ok, only_defect, "defect", 0)
    assert decision.action == Action.REVIEW
    assert decision.review_reason == ReviewReason.LOW_CONFIDENCE
    at_one = decide("p", AutomationLevel.PARTIAL, "active", certain_ok, {"ok": 1.0}, "defect", 0)
    assert at_one.action == Action.PASS  # an explicit 1.0 is cleared by 1.0


def test_full_decides_everything() -> None:
    for output, action in ((UNSURE_OK, Action.PASS), (SURE_DEFECT, Action.REJECT)):
        decision = decide("p", AutomationLevel.FULL, "candidate", output, THRESHOLDS, "defect", 0)
        assert decision.action == action and decision.decided_by == DecidedBy.CANDIDATE


@pytest.mark.parametrize("automation", list(AutomationLevel))
def test_a_failed_model_never_passes_a_part(automation: AutomationLevel) -> None:
    decision = decide("p", automation, "active", FAILED, THRESHOLDS, "defect", 0)
    assert decision.action == Action.REVIEW
    assert decision.decided_by == DecidedBy.FAILSAFE
    assert decision.review_reason == ReviewReason.FAILSAFE


def test_audit_fraction_sends_a_stable_share_to_review() -> None:
    parts = [f"part-{i}" for i in range(20_000)]
    audited = [
        decide(p, AutomationLevel.FULL, "active", SURE_OK, THRESHOLDS, "defect", 0.02).audit
        for p in parts
    ]
    assert 0.015 < sum(audited) / len(parts) < 0.025
    again = decide(parts[audited.index(True)], AutomationLevel.FULL, "active", SURE_OK,
                   THRESHOLDS, "defect", 0.02)
    assert again.audit and again.review_reason == ReviewReason.AUDIT
    assert again.action == Action.PASS  # an audit asks for a label; it does not hold the part


def test_canary_uses_a_stable_fraction_of_parts() -> None:
    parts = [f"part-{i}" for i in range(20_000)]
    chosen = [decider_for(p, DeploymentMode.CANARY, 0.1, "active", True) for p in parts]
    share = chosen.count("candidate") / len(parts)
    assert 0.09 < share < 0.11
    assert chosen == [decider_for(p, DeploymentMode.CANARY, 0.1, "active", True) for p in parts]


def test_only_canary_and_blue_green_let_the_candidate_decide() -> None:
    assert decider_for("p", DeploymentMode.SHADOW, 1.0, "candidate", True) == "active"
    assert decider_for("p", DeploymentMode.NONE, 1.0, "candidate", True) == "active"
    assert decider_for("p", DeploymentMode.BLUE_GREEN, 0, "candidate", True) == "candidate"
    assert decider_for("p", DeploymentMode.BLUE_GREEN, 0, "active", True) == "active"
    assert decider_for("p", DeploymentMode.CANARY, 1.0, "active", False) == "active"


def test_agreement_needs_two_working_models() -> None:
    assert agree(SURE_OK, UNSURE_OK)
    assert not agree(SURE_OK, SURE_DEFECT)
    assert not agree(FAILED, FAILED)


@given(st.text(max_size=50), st.text(max_size=10))
def test_unit_hash_is_in_range(part_id: str, salt: str) -> None:
    value = unit_hash(part_id, salt)
    assert 0 <= value < 1 and value == unit_hash(part_id, salt)
