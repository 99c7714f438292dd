"""Policy edges: threshold boundaries, labels without a threshold, audit 0 and 1, stable hashing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge_agent.policy import ModelOutput, decide, decider_for, unit_hash
from linesight.protocol import Action, AutomationLevel, DecidedBy, DeploymentMode, ReviewReason

pytestmark = pytest.mark.unit

PARTS = [f"part-{i}" for i in range(2_000)]


def test_a_confidence_exactly_at_the_threshold_is_decided_and_just_below_is_reviewed() -> None:
    at = decide("p", AutomationLevel.PARTIAL, "active", ModelOutput("ok", 0.8, 1), {"ok": 0.8},
                "defect", 0)
    below = decide("p", AutomationLevel.PARTIAL, "active",
                   ModelOutput("ok", 0.7999999, 1), {"ok": 0.8}, "defect", 0)
    assert (at.action, at.decided_by) == (Action.PASS, DecidedBy.ACTIVE)
    assert (below.action, below.review_reason) == (Action.REVIEW, ReviewReason.LOW_CONFIDENCE)


def test_a_label_without_a_threshold_is_reviewed_unless_certain() -> None:
    # Thresholds naming labels the model lacks cover none of its own labels.
    thresholds = {"good": 0.1, "bad": 0.1}
    unsure = decide("p", AutomationLevel.PARTIAL, "active", ModelOutput("ok", 0.99, 1),
                    thresholds, "defect", 0)
    assert unsure.action == Action.REVIEW


def test_audit_fraction_zero_audits_nothing_and_one_audits_everything() -> None:
    sure = ModelOutput("ok", 0.99, 1)
    none = [decide(p, AutomationLevel.FULL, "active", sure, {}, "defect", 0.0) for p in PARTS]
    every = [decide(p, AutomationLevel.FULL, "active", sure, {}, "defect", 1.0) for p in PARTS]
    assert not any(d.audit for d in none)
    assert all(d.audit and d.action == Action.PASS for d in every)


def test_canary_fraction_one_sends_every_part_to_the_candidate() -> None:
    assert {decider_for(p, DeploymentMode.CANARY, 1.0, "active", True) for p in PARTS} == {
        "candidate"
    }


def test_the_part_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from edge_agent.policy import unit_hash; print(repr(unit_hash('part-7', 'canary')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert float(out) == unit_hash("part-7", "canary")
    # Pinned: a restart on another release must split the canary the same way.
    assert unit_hash("part-7", "canary") == 0.48492245682194907
