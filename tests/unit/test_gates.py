"""The rollout gate: what a quality engineer would see it do."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.gate_quality import (
    design_scenarios,
    false_promotion_rate,
    sequential_gate,
    simulate_streams,
)
from deploy.gates import (
    GateConfig,
    GateDecision,
    GateOutcome,
    GuardMetrics,
    PairedEvidence,
    evaluate_gate,
    evaluate_guards,
)

pytestmark = pytest.mark.unit

CONFIG = GateConfig()
ORDER = {GateOutcome.FAIL: 0, GateOutcome.CONTINUE: 1, GateOutcome.PASS: 2}


def gate(
    labelled: int, right: int, parts: int = 10_000, disagreements: int = 1_000
) -> GateDecision:
    evidence = PairedEvidence(
        parts=parts,
        disagreements=max(disagreements, labelled),
        labelled_disagreements=labelled,
        candidate_right=right,
    )
    return evaluate_gate(evidence, CONFIG)


# --- decisions -------------------------------------------------------------------------------


def test_clearly_better_candidate_passes() -> None:
    decision = gate(labelled=60, right=45)
    assert decision.outcome is GateOutcome.PASS
    assert decision.error_diff_estimate is not None and decision.error_diff_estimate < 0
    assert decision.error_diff_upper is not None and decision.error_diff_upper <= CONFIG.delta
    assert "pass" in decision.reason


def test_clearly_worse_candidate_fails() -> None:
    decision = gate(labelled=60, right=15)
    assert decision.outcome is GateOutcome.FAIL
    assert decision.error_diff_estimate is not None and decision.error_diff_estimate > 0
    assert "fail" in decision.reason


def test_tie_continues_until_enough_evidence_then_passes() -> None:
    # Equal candidate (right on half the disagreements): no verdict early, a pass eventually.
    assert gate(labelled=20, right=10).outcome is GateOutcome.CONTINUE
    assert gate(labelled=60, right=30).outcome is GateOutcome.CONTINUE
    assert gate(labelled=400, right=200).outcome is GateOutcome.PASS


def test_never_decides_below_min_labels() -> None:
    config = GateConfig(min_labels=20)
    for right in (0, 19):
        evidence = PairedEvidence(10_000, 1_000, 19, right)
        decision = evaluate_gate(evidence, config)
        assert decision.outcome is GateOutcome.CONTINUE
        assert "at least 20" in decision.reason


def test_no_evidence_yet_continues_without_figures() -> None:
    decision = evaluate_gate(PairedEvidence(0, 0, 0, 0), CONFIG)
    assert decision.outcome is GateOutcome.CONTINUE
    assert decision.error_diff_estimate is None and decision.llr is None


def test_dashboard_figures_match_the_evidence() -> None:
    decision = gate(labelled=100, right=40, parts=10_000, disagreements=1_000)
    # d = 0.1, p = 0.4: the candidate makes 2 points more errors.
    assert decision.error_diff_estimate == pytest.approx(0.02)
    assert decision.error_diff_upper is not None and decision.error_diff_upper > 0.02
    assert decision.llr is not None


def test_low_disagreement_rate_cannot_hide_a_run_of_wrong_verdicts() -> None:
    # d below delta: no candidate can be worse by delta, but all-wrong verdicts still fail it.
    decision = gate(labelled=20, right=0, parts=10_000, disagreements=100)
    assert decision.outcome is GateOutcome.FAIL


def test_few_parts_make_the_gate_more_cautious_not_less() -> None:
    # Same labels and the same 4% disagreement rate, once measured on 250 000 parts and once on
    # 1 000: the estimate from few parts is noisy, so the gate asks for more before passing.
    plentiful = gate(labelled=40, right=18, parts=250_000, disagreements=10_000)
    scarce = gate(labelled=40, right=18, parts=1_000, disagreements=40)
    assert plentiful.outcome is GateOutcome.PASS
    assert scarce.outcome is GateOutcome.CONTINUE
    assert scarce.error_diff_upper is not None and plentiful.error_diff_upper is not None
    assert scarce.error_diff_upper > plentiful.error_diff_upper


# --- guards ----------------------------------------------------------------------------------


def healthy(**changes: object) -> GuardMetrics:
    values: dict[str, object] = {
        "online": True, "faults": 0, "p95_latency_ms": 40.0, "disagreement_rate": 0.05,
    }
    values.update(changes)
    return GuardMetrics(**values)  # type: ignore[arg-type]


def test_healthy_station_has_no_guard_failures() -> None:
    assert evaluate_guards(healthy(), GateConfig(max_p95_latency_ms=80.0)) == []


def test_guards_fire_for_offline_faults_latency_and_disagreement() -> None:
    config = GateConfig(max_p95_latency_ms=80.0, max_disagreement_rate=0.2)
    assert evaluate_guards(healthy(online=False), config) == ["station offline"]
    assert evaluate_guards(healthy(faults=3), config) == ["3 fault(s) reported"]
    [latency] = evaluate_guards(healthy(p95_latency_ms=95.0), config)
    assert "95.0 ms" in latency and "80.0 ms" in latency
    [disagreement] = evaluate_guards(healthy(disagreement_rate=0.35), config)
    assert "35.0%" in disagreement and "20.0%" in disagreement
    everything = healthy(online=False, faults=1, p95_latency_ms=95.0, disagreement_rate=0.35)
    assert len(evaluate_guards(everything, config)) == 4


def test_guards_without_a_ceiling_or_a_measurement_stay_quiet() -> None:
    no_ceilings = GateConfig(max_p95_latency_ms=None, max_disagreement_rate=None)
    assert evaluate_guards(healthy(p95_latency_ms=10_000.0, disagreement_rate=0.9),
                           no_ceilings) == []
    unmeasured = healthy(p95_latency_ms=None, disagreement_rate=None)
    assert evaluate_guards(unmeasured, GateConfig(max_p95_latency_ms=80.0)) == []


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "field"),
    [
        ((-1, 0, 0, 0), "parts"),
        ((10, -1, 0, 0), "disagreements"),
        ((10, 20, 0, 0), "disagreements"),
        ((10, 5, 6, 0), "labelled_disagreements"),
        ((10, 5, 4, 5), "candidate_right"),
        ((10, 5, 4, -1), "candidate_right"),
        ((10.0, 5, 4, 1), "parts"),
    ],
)
def test_impossible_evidence_is_rejected_naming_the_field(
    counts: tuple[int, int, int, int], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        PairedEvidence(*counts)


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": "0.02"}, "delta"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": True}, "beta"),
        ({"min_labels": 2.5}, "min_labels"),
        ({"min_labels": 0}, "min_labels"),
        ({"max_disagreement_rate": 0.0}, "max_disagreement_rate"),
        ({"max_p95_latency_ms": -5}, "max_p95_latency_ms"),
        ({"aplha": 0.05}, "aplha"),
    ],
)
def test_bad_plan_settings_are_rejected_naming_the_key(
    mapping: dict[str, object], key: str
) -> None:
    with pytest.raises(ValueError, match=f"^{key}:"):
        GateConfig.from_mapping(mapping)


def test_plan_settings_build_the_config() -> None:
    config = GateConfig.from_mapping(
        {"delta": 0.01, "alpha": 0.01, "beta": 0.1, "min_labels": 30,
         "max_disagreement_rate": None, "max_p95_latency_ms": 120}
    )
    assert config == GateConfig(0.01, 0.01, 0.1, 30, None, 120.0)
    assert GateConfig.from_mapping({}) == GateConfig()


def test_bad_guard_metrics_are_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match="^faults:"):
        healthy(faults=-1)
    with pytest.raises(ValueError, match="^disagreement_rate:"):
        healthy(disagreement_rate=1.5)
    with pytest.raises(ValueError, match="^p95_latency_ms:"):
        healthy(p95_latency_ms=-1.0)


# --- properties ------------------------------------------------------------------------------


@st.composite
def evidence_and_config(draw: st.DrawFn) -> tuple[PairedEvidence, GateConfig]:
    parts = draw(st.integers(1, 50_000))
    disagreements = draw(st.integers(0, parts))
    labelled = draw(st.integers(0, disagreements))
    right = draw(st.integers(0, labelled))
    config = GateConfig(
        delta=draw(st.floats(0.001, 0.2)),
        alpha=draw(st.floats(0.001, 0.3)),
        beta=draw(st.floats(0.01, 0.5)),
        min_labels=draw(st.integers(1, 50)),
    )
    return PairedEvidence(parts, disagreements, labelled, right), config


@settings(max_examples=300, deadline=None)
@given(evidence_and_config())
def test_more_candidate_right_labels_never_move_the_outcome_towards_fail(
    case: tuple[PairedEvidence, GateConfig],
) -> None:
    evidence, config = case
    if evidence.candidate_right == evidence.labelled_disagreements:
        return
    better = PairedEvidence(
        evidence.parts, evidence.disagreements, evidence.labelled_disagreements,
        evidence.candidate_right + 1,
    )
    assert ORDER[evaluate_gate(better, config).outcome] >= ORDER[
        evaluate_gate(evidence, config).outcome
    ]


@settings(max_examples=300, deadline=None)
@given(evidence_and_config())
def test_outcome_is_deterministic_and_consistent_with_its_figures(
    case: tuple[PairedEvidence, GateConfig],
) -> None:
    evidence, config = case
    decision = evaluate_gate(evidence, config)
    assert decision == evaluate_gate(evidence, config)
    if evidence.labelled_disagreements < config.min_labels:
        assert decision.outcome is GateOutcome.CONTINUE
    if decision.error_diff_estimate is not None:
        assert decision.error_diff_upper is not None
        assert decision.error_diff_upper >= decision.error_diff_estimate - 1e-12
    if decision.outcome is GateOutcome.PASS:
        # The dashboard never shows a pass beside an upper bound above the margin.
        assert decision.error_diff_upper is not None
        assert decision.error_diff_upper <= config.delta + 1e-9
    if decision.outcome is GateOutcome.FAIL:
        assert decision.error_diff_estimate is not None and decision.error_diff_estimate > 0


# --- statistics ------------------------------------------------------------------------------


def test_false_promotion_rate_stays_at_alpha_under_continuous_checking() -> None:
    # 400 rollouts of a candidate exactly delta worse, gate checked after every verdict.
    rate = false_promotion_rate(CONFIG, disagreement_rate=0.1, rollouts=400, seed=7)
    assert rate <= CONFIG.alpha + 0.02


def test_benchmark_simulation_decides_exactly_as_the_gate() -> None:
    # The benchmark vectorises the gate; replay its streams through evaluate_gate verdict by
    # verdict and expect the same outcome after the same number of labels.
    rng = np.random.default_rng(11)
    for scenario in design_scenarios(0.1, CONFIG.delta):
        streams = simulate_streams(scenario, rollouts=15, horizon=600, rng=rng)
        simulated = sequential_gate(streams, CONFIG)
        for row in range(15):
            outcome, labels = GateOutcome.CONTINUE, 600
            for n in range(1, 601):
                decision = evaluate_gate(
                    PairedEvidence(
                        parts=int(streams.parts[row, n - 1]),
                        disagreements=n,
                        labelled_disagreements=n,
                        candidate_right=int(streams.candidate_right[row, n - 1]),
                    ),
                    CONFIG,
                )
                if decision.outcome is not GateOutcome.CONTINUE:
                    outcome, labels = decision.outcome, n
                    break
            assert bool(simulated.decided[row]) == (outcome is not GateOutcome.CONTINUE)
            assert bool(simulated.promoted[row]) == (outcome is GateOutcome.PASS)
            assert int(simulated.labels[row]) == labels
