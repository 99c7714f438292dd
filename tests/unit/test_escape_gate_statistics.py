"""The escaped-defect gate as a rollout stage judges it, simulated: its false-promotion rate with
only some disagreements labelled, and its rare-event pass looked at after every part.

Both use `deploy.rollout.judge`, the function the controller's tick calls, on evidence built the
way `SqliteFleetStore.paired_evidence` builds it: the first through bench/gate_quality.py's
vectorised copy of it, which a test here replays through `judge` verdict by verdict.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.gate_quality import (
    ESCAPE_DEFECT_SHARE,
    ESCAPE_DISAGREEMENT_RATE,
    escape_config,
    escape_gate,
    simulate_labelled_streams,
)
from deploy.gates import (
    GateConfig,
    GateOutcome,
    PairedEvidence,
    disagreement_rate_upper,
    evaluate_gate,
    evaluate_rare_gate,
)
from deploy.plan import Stage, parse_plan
from deploy.rollout import StageEvidence, judge

pytestmark = pytest.mark.unit

ESCAPE_DELTA = 0.01
ALPHA = 0.05


def shadow_stage() -> Stage:
    plan = parse_plan({
        "name": "escape-gate",
        "stages": [{"name": "shadow", "stations": ["s1"], "mode": "shadow",
                    "gate": {"escape_delta": ESCAPE_DELTA, "alpha": ALPHA}},
                   {"name": "everywhere", "stations": "all", "mode": "promote"}],
    })
    stage: Stage = plan.stages[0]
    return stage


def stage_evidence(
    parts: int, disagreements: int, labelled: int, right: int,
    labelled_defects: int, defects_right: int,
) -> StageEvidence:
    """The counts as `SqliteFleetStore.paired_evidence` turns them into evidence: the defect
    disagreements are the labelled defect share scaled up to every disagreement."""
    unlabelled = disagreements - labelled
    estimated = (
        labelled_defects + round(unlabelled * labelled_defects / labelled) if labelled else 0
    )
    return StageEvidence(
        overall=PairedEvidence(parts, disagreements, labelled, right),
        escapes=PairedEvidence(parts, estimated, labelled_defects, defects_right),
        possible_escapes=labelled_defects + unlabelled,
    )


def test_partial_labelling_does_not_raise_the_escape_gates_false_promotions() -> None:
    # Rollouts of a candidate exactly escape_delta worse on escaped defects: disagreements at 10%
    # of parts, 15% of them defects; a fifth of the disagreements, a fair sample, get a verdict,
    # and the gate is judged after every verdict (vectorised in bench/gate_quality.py; the test
    # below replays its streams through `judge` and expects the same decisions). With the
    # defect-disagreement rate estimated from the labelled defect share, taken as if counted,
    # 101 of these 1500 are promoted (6.7%, alpha 0.05); with the noise of the share accounted
    # for, 26. More than 75 (alpha) is far out of reach by chance at a rate under 2%.
    rollouts, horizon = 1500, 1500
    p_right = 0.5 - ESCAPE_DELTA / (2.0 * ESCAPE_DISAGREEMENT_RATE * ESCAPE_DEFECT_SHARE)
    streams = simulate_labelled_streams(
        p_right, 0.2, rollouts, horizon, np.random.default_rng(20240612)
    )
    config = escape_config(ALPHA, 0.2, 10)
    gate = escape_gate(streams, config)
    assert gate.decided.all(), "lengthen the horizon: some rollouts were not decided"
    assert int(gate.promoted.sum()) <= ALPHA * rollouts
    as_if_counted = escape_gate(streams, config, labelling_noise=False)
    assert int(as_if_counted.promoted.sum()) > ALPHA * rollouts, "the test would not see it"


def passes_looking_at_every_part(rollouts: int, parts: int, seed: int) -> int:
    """Rollouts whose candidate is exactly escape_delta worse, with no labels at all (a backlog
    of verdicts: every disagreement may be a defect), that the escape gate passes at some part
    up to `parts`, judged after every part.

    At a fixed count k of disagreements the rare-event pass only gets easier as parts come in,
    so it is enough to know the first part count at which k passes (found with `judge`) and
    whether the (k+1)-th disagreement arrives after it."""
    stage = shadow_stage()

    def passes(k: int, n: int) -> bool:
        evidence = PairedEvidence(n, k, 0, 0)
        decision = judge(stage, StageEvidence(evidence, evidence, possible_escapes=k))
        return decision.escapes.outcome is GateOutcome.PASS

    most = int(parts * ESCAPE_DELTA + 10 * math.sqrt(parts * ESCAPE_DELTA) + 10)
    first_pass = np.full(most + 1, parts + 1, dtype=np.int64)
    for k in range(most + 1):
        low, high = max(k, 1), parts + 1
        if not passes(k, parts):
            continue
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if passes(k, middle) else (middle + 1, high)
        first_pass[k] = low
    rng = np.random.default_rng(seed)
    # Part number of the (k+1)-th disagreement, k = 0, 1, ...: k holds until the part before.
    arrival = np.cumsum(rng.geometric(ESCAPE_DELTA, size=(rollouts, most + 1)), axis=1)
    last_with_k = np.minimum(arrival - 1, parts)
    assert (arrival[:, -1] > parts).all(), "simulate more disagreements"
    return int((first_pass[None, :] <= last_with_k).any(axis=1).sum())


def test_the_rare_event_pass_holds_alpha_when_looked_at_after_every_part() -> None:
    # Checked after every part for 200 000 parts, the fixed-sample (Bernstein) bound passed 291
    # of these 2000 (14.6%). A time-uniform bound passes at most alpha (Ville's inequality; this
    # one 101): alpha, give or take three standard errors of 2000 rollouts' noise.
    rollouts = 2000
    passed = passes_looking_at_every_part(rollouts, parts=200_000, seed=20240613)
    slack = 3.0 * math.sqrt(ALPHA * (1.0 - ALPHA) * rollouts)
    assert passed <= ALPHA * rollouts + slack


def test_a_line_without_defect_disagreements_still_passes_the_escape_gate_soon() -> None:
    # No disagreement at all: the time-uniform bound passes at 368 parts (the fixed-sample bound
    # did at 300) with escape_delta 0.01 and alpha 0.05.
    stage = shadow_stage()

    def escape_outcome(parts: int) -> GateOutcome:
        evidence = PairedEvidence(parts, 0, 0, 0)
        return judge(stage, StageEvidence(evidence, evidence, possible_escapes=0)).escapes.outcome

    assert escape_outcome(367) is GateOutcome.CONTINUE
    decision = judge(stage, StageEvidence(PairedEvidence(368, 0, 0, 0),
                                          PairedEvidence(368, 0, 0, 0), possible_escapes=0))
    assert decision.escapes.outcome is GateOutcome.PASS
    assert decision.escapes.error_diff_upper is not None
    assert decision.escapes.error_diff_upper <= ESCAPE_DELTA


def test_benchmark_escape_simulation_decides_exactly_as_the_stage_gate() -> None:
    # bench/gate_quality.py vectorises the escape gate; replay its streams through `judge`
    # verdict by verdict and expect the same outcome after the same number of verdicts.
    config = escape_config(ALPHA, 0.2, 10)
    stage = shadow_stage()
    defect_rate = ESCAPE_DISAGREEMENT_RATE * ESCAPE_DEFECT_SHARE
    rng = np.random.default_rng(17)
    for share in (1.0, 0.2):
        for p_right in (0.5 - ESCAPE_DELTA / (2.0 * defect_rate), 0.5):
            for labelling_noise in (True, False):
                streams = simulate_labelled_streams(p_right, share, 12, 400, rng)
                simulated = escape_gate(streams, config, labelling_noise=labelling_noise)
                for row in range(12):
                    outcome, labels = GateOutcome.CONTINUE, 400
                    for n in range(1, 401):
                        evidence = stage_evidence(
                            int(streams.parts[row, n - 1]),
                            int(streams.disagreements[row, n - 1]), n,
                            int(streams.candidate_right[row, n - 1]),
                            int(streams.defects[row, n - 1]),
                            int(streams.defects_right[row, n - 1]),
                        )
                        if labelling_noise:
                            outcome = judge(stage, evidence).escapes.outcome
                        else:
                            outcome = evaluate_rare_gate(
                                evidence.escapes, config, possible=evidence.possible_escapes
                            ).outcome
                        if outcome is not GateOutcome.CONTINUE:
                            labels = n
                            break
                    assert bool(simulated.decided[row]) == (outcome is not GateOutcome.CONTINUE)
                    assert bool(simulated.promoted[row]) == (outcome is GateOutcome.PASS)
                    assert int(simulated.labels[row]) == labels


def test_an_estimated_count_makes_the_gate_more_cautious_only_when_labels_are_missing() -> None:
    config = GateConfig(delta=ESCAPE_DELTA)
    # 150 defect disagreements among 1000 in 10 000 parts, 30 of them labelled, 12 with the
    # candidate right: right on 40% of defect disagreements at 1.5 x escape_delta.
    escapes = PairedEvidence(10_000, 150, 30, 12)
    counted = evaluate_gate(escapes, config)
    everything_labelled = PairedEvidence(10_000, 1000, 1000, 500)
    assert evaluate_gate(escapes, config, estimated_from=everything_labelled) == counted
    # The same 150, scaled up from 30 defects among 200 labelled disagreements: they could as
    # well be 120 or 180, and fewer defect disagreements make a worse candidate look better.
    a_fifth_labelled = PairedEvidence(10_000, 1000, 200, 100)
    estimated = evaluate_gate(escapes, config, estimated_from=a_fifth_labelled)
    assert counted.outcome is GateOutcome.PASS and estimated.outcome is GateOutcome.CONTINUE
    assert estimated.error_diff_upper is not None and counted.error_diff_upper is not None
    assert estimated.error_diff_upper > ESCAPE_DELTA >= counted.error_diff_upper


def test_an_estimate_from_fewer_labels_than_it_claims_is_refused() -> None:
    with pytest.raises(ValueError, match="^estimated_from: 61 labelled"):
        evaluate_gate(PairedEvidence(1000, 100, 61, 30), GateConfig(),
                      estimated_from=PairedEvidence(1000, 100, 60, 30))


@settings(max_examples=300, deadline=None)
@given(
    parts=st.integers(0, 500_000), count=st.integers(0, 5_000),
    delta=st.floats(0.001, 0.2), alpha=st.floats(0.001, 0.3),
)
def test_the_rare_pass_and_its_shown_bound_never_disagree(
    parts: int, count: int, delta: float, alpha: float
) -> None:
    config = GateConfig(delta=delta, alpha=alpha)
    count = min(count, parts)
    evidence = PairedEvidence(parts, count, 0, 0)
    decision = evaluate_rare_gate(evidence, config)
    upper = disagreement_rate_upper(count, parts, alpha)
    assert (decision.outcome is GateOutcome.PASS) == (upper <= delta)
    if decision.outcome is GateOutcome.PASS:
        assert decision.error_diff_upper is not None and decision.error_diff_upper <= delta
    # More disagreements in as many parts never make the bound lower.
    assert disagreement_rate_upper(min(count + 1, parts), parts, alpha) >= upper
