"""The gate statistics, audited against docs/gates.md with values computed here from the
documented formulas (binomial likelihoods, normal quantiles from a table), not by the gate's own
helpers: what a quality engineer checks before trusting the gate with a production line."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from deploy.gates import (
    GateConfig,
    GateOutcome,
    GuardMetrics,
    PairedEvidence,
    evaluate_gate,
    evaluate_guards,
    evaluate_rare_gate,
)
from deploy.plan import parse_plan
from deploy.rollout import (
    CandidateSpec,
    CommandAcked,
    Phase,
    RolloutState,
    StageEvidence,
    StageStep,
    StationView,
    Tick,
    judge,
    start,
    transition,
)
from linesight import protocol as p

pytestmark = pytest.mark.unit

# Upper quantiles of the standard normal distribution, from a printed table.
Z_UPPER = {0.05: 1.6448536269514722, 0.01: 2.3263478740408408}
P0_FLOOR = 0.01  # docs/gates.md: p0 never below 1%


# --- the documented formulas, computed independently ------------------------------------------


def p0_of(d: float, delta: float) -> float:
    """p0 = 1/2 - delta / (2d), on its 1% floor."""
    return max(0.5 - delta / (2.0 * d), P0_FLOOR) if d > 0 else P0_FLOOR


def binomial_llr(k: int, n: int, p0: float) -> float:
    """log of Binom(k; n, 1/2) / Binom(k; n, p0): the binomial coefficients cancel, but they
    are kept so that this is the ratio of the two likelihoods as written."""
    not_worse = math.comb(n, k) * 0.5**n
    worse = math.comb(n, k) * p0**k * (1.0 - p0) ** (n - k)
    return math.log(not_worse / worse)


def noise_ratio(parts: int, disagreements: int, labelled: int, delta: float, alpha: float) -> float:
    """docs/gates.md: the shift of p0 per standard error of d (d moved up by one and by z_alpha
    standard errors, the larger shift counts), squared, over the variance p0 (1 - p0) / n."""
    d = disagreements / parts
    se = math.sqrt(d * (1.0 - d) / parts)
    p0 = p0_of(d, delta)
    shifts = [(p0_of(d + z * se, delta) - p0) / z for z in (1.0, max(1.0, Z_UPPER[alpha]))]
    return max(shifts) ** 2 / (p0 * (1.0 - p0) / labelled)


def pass_at(parts: int, disagreements: int, labelled: int, delta: float, alpha: float) -> float:
    return (1.0 + noise_ratio(parts, disagreements, labelled, delta, alpha)) * math.log(1 / alpha)


def evidence(parts: int, disagreements: int, labelled: int, right: int) -> PairedEvidence:
    return PairedEvidence(parts=parts, disagreements=disagreements,
                          labelled_disagreements=labelled, candidate_right=right)


CONFIG = GateConfig(delta=0.02, alpha=0.05, beta=0.2, min_labels=10)


# --- the error-rate gate ----------------------------------------------------------------------


def test_every_figure_matches_its_documented_formula() -> None:
    # 1 000 parts, 100 disagreements, 20 labelled, the candidate right on 12: d = 0.1,
    # p0 = 1/2 - 0.02 / 0.2 = 0.4.
    decision = evaluate_gate(evidence(1000, 100, 20, 12), CONFIG)
    assert decision.llr == pytest.approx(binomial_llr(12, 20, 0.4), rel=1e-12)
    assert decision.llr == pytest.approx(12 * math.log(1.25) + 8 * math.log(0.5 / 0.6))
    assert decision.error_diff_estimate == pytest.approx(0.1 * (1 - 2 * 12 / 20))  # -0.02
    threshold = pass_at(1000, 100, 20, 0.02, 0.05)
    assert math.log(0.2) < binomial_llr(12, 20, 0.4) < threshold
    assert decision.outcome is GateOutcome.CONTINUE
    # The upper bound is d (1 - 2 p*), p* the p' at which L(1/2) / L(p') meets the threshold.
    upper = decision.error_diff_upper
    assert upper is not None
    p_star = (1.0 - upper / 0.1) / 2.0
    assert binomial_llr(12, 20, p_star) == pytest.approx(threshold, abs=1e-9)
    assert 0.0 <= upper <= 0.1


def test_a_candidate_right_on_every_disagreement_passes_at_the_first_look_the_formula_allows() -> (
    None
):
    # So many parts that d is known; then L(1/2) / L(0.4) = 1.25^n must reach 1/alpha (times
    # the tiny noise raise): the first such n is where it passes, not a label earlier.
    parts, disagreements = 10_000_000, 1_000_000
    first = next(
        n for n in range(1, 100)
        if n * math.log(1.25) >= pass_at(parts, disagreements, n, 0.02, 0.05)
    )
    assert first == 14  # 1.25^13 = 18.2 < 20 <= 1.25^14 = 22.7
    before = evaluate_gate(evidence(parts, disagreements, first - 1, first - 1), CONFIG)
    assert before.outcome is GateOutcome.CONTINUE
    passed = evaluate_gate(evidence(parts, disagreements, first, first), CONFIG)
    assert passed.outcome is GateOutcome.PASS
    # With k = n the bound has a closed form: n log(1 / (2 p')) = threshold.
    threshold = pass_at(parts, disagreements, first, 0.02, 0.05)
    assert passed.error_diff_upper == pytest.approx(0.1 * (1 - math.exp(-threshold / first)))
    assert passed.error_diff_estimate == pytest.approx(-0.1)


@pytest.mark.parametrize(("beta", "first_fail"), [(0.2, 10), (0.1, 13)])
def test_a_candidate_wrong_on_every_disagreement_fails_where_the_formula_says(
    beta: float, first_fail: int
) -> None:
    # (0.5 / 0.6)^n <= beta: n >= 8.8 at beta 0.2 (held to min_labels = 10), n >= 12.6 at 0.1.
    config = GateConfig(delta=0.02, alpha=0.05, beta=beta, min_labels=10)
    expected = max(config.min_labels, math.ceil(math.log(beta) / math.log(0.5 / 0.6)))
    assert expected == first_fail
    before = evaluate_gate(evidence(1000, 100, first_fail - 1, 0), config)
    assert before.outcome is GateOutcome.CONTINUE
    failed = evaluate_gate(evidence(1000, 100, first_fail, 0), config)
    assert failed.outcome is GateOutcome.FAIL
    # No p' is excluded: the candidate may be wrong on every disagreement.
    assert failed.error_diff_upper == pytest.approx(0.1)
    assert failed.error_diff_estimate == pytest.approx(0.1)
    assert failed.llr == pytest.approx(binomial_llr(0, first_fail, 0.4))


def test_min_labels_reached_exactly_is_enough_and_one_fewer_is_not() -> None:
    config = GateConfig(min_labels=25)
    strong = evaluate_gate(evidence(1_000_000, 100_000, 24, 24), config)
    assert strong.outcome is GateOutcome.CONTINUE and "at least 25" in strong.reason
    assert strong.llr is not None and strong.llr > pass_at(1_000_000, 100_000, 24, 0.02, 0.05)
    assert evaluate_gate(evidence(1_000_000, 100_000, 25, 25), config).outcome is GateOutcome.PASS


@pytest.mark.parametrize(
    "counts",
    [(0, 0, 0, 0), (500, 0, 0, 0), (500, 40, 0, 0), (1, 1, 0, 0), (100_000, 0, 0, 0)],
)
def test_no_labelled_disagreement_never_decides_and_shows_no_figures(
    counts: tuple[int, int, int, int],
) -> None:
    decision = evaluate_gate(evidence(*counts), CONFIG)
    assert decision.outcome is GateOutcome.CONTINUE
    assert (decision.error_diff_estimate, decision.error_diff_upper, decision.llr) == (
        None, None, None
    )


def test_a_tiny_sample_where_every_part_disagrees_does_not_pass() -> None:
    # d = 1: p0 = 1/2 - 0.01 = 0.49, so twelve right verdicts are worth 12 log(0.5/0.49) = 0.24.
    decision = evaluate_gate(evidence(12, 12, 12, 12), GateConfig(min_labels=1))
    assert decision.llr == pytest.approx(binomial_llr(12, 12, 0.49))
    assert decision.outcome is GateOutcome.CONTINUE
    assert decision.error_diff_upper is not None and decision.error_diff_upper > 0.02


def test_a_rate_near_delta_on_few_parts_raises_the_pass_threshold_as_documented() -> None:
    # d = 12/600 = delta exactly: p0 sits on its 1% floor, yet the true d may well be above
    # delta; d moved up by z_alpha standard errors shows how much (docs/gates.md).
    threshold = (1 + noise_ratio(600, 12, 12, 0.02, 0.05)) * math.log(20)
    assert threshold > 10 * math.log(20)
    config = GateConfig(min_labels=10)
    # Ten right and two wrong: log L(1/2)/L(0.01) = 10 log 50 + 2 log(0.5/0.99) = 37.8, far
    # above log 20 = 3.0 but below the raised threshold (40.1): keep collecting.
    ten = evaluate_gate(evidence(600, 12, 12, 10), config)
    assert ten.llr == pytest.approx(binomial_llr(10, 12, 0.01))
    assert math.log(20) < binomial_llr(10, 12, 0.01) < threshold
    assert ten.outcome is GateOutcome.CONTINUE
    # Eleven of twelve (42.4) pass.
    assert binomial_llr(11, 12, 0.01) >= threshold
    assert evaluate_gate(evidence(600, 12, 12, 11), config).outcome is GateOutcome.PASS


# --- the escaped-defect gate's rare-event pass -----------------------------------------------


def rare_evidence(count: int, parts: int, q: float) -> float:
    """log of the mean over r in (1/2, 1/4, 1/8, 1/16) of r^k ((1 - r q) / (1 - q))^(n - k)."""
    terms = [count * math.log(r) + (parts - count) * math.log((1 - r * q) / (1 - q))
             for r in (1 / 2, 1 / 4, 1 / 8, 1 / 16)]
    return math.log(sum(math.exp(t) for t in terms) / len(terms))


@pytest.mark.parametrize(
    ("count", "parts_needed"),
    [(0, 368), (1, 608), (2, 829), (3, 1033), (5, 1403), (10, 2212), (20, 3640)],
)
def test_rare_pass_needs_the_parts_in_the_documented_table(count: int, parts_needed: int) -> None:
    config = GateConfig(delta=0.01, alpha=0.05)
    first = next(n for n in range(count + 1, 10_000)
                 if rare_evidence(count, n, 0.01) >= math.log(20))
    assert first == parts_needed
    no_labels = evidence(first - 1, count, 0, 0)
    assert evaluate_rare_gate(no_labels, config).outcome is GateOutcome.CONTINUE
    passed = evaluate_rare_gate(evidence(first, count, 0, 0), config)
    assert passed.outcome is GateOutcome.PASS
    assert passed.error_diff_upper is not None and passed.error_diff_upper <= 0.01


def test_rare_pass_counts_every_unlabelled_disagreement_not_the_estimate() -> None:
    # No defect among the few labels: the estimate says 0 defect disagreements, but five
    # unlabelled ones may be defects, so 368 parts (enough for 0) are not enough (1 403 are).
    config = GateConfig(delta=0.01, alpha=0.05)
    estimate = evidence(1402, 0, 0, 0)
    assert evaluate_rare_gate(estimate, config, possible=5).outcome is GateOutcome.CONTINUE
    assert evaluate_rare_gate(evidence(1403, 0, 0, 0), config, possible=5).outcome is (
        GateOutcome.PASS
    )


def test_the_rare_pass_never_overrides_a_failure() -> None:
    # Wrong on all 20 labelled defect disagreements in 100 000 parts: the rate bound alone
    # would pass (20 in 100 000 is far below 1%), the labels fail it.
    config = GateConfig(delta=0.01, alpha=0.05, beta=0.1)
    decision = evaluate_rare_gate(evidence(100_000, 20, 20, 0), config, possible=20)
    assert decision.outcome is GateOutcome.FAIL


# --- guards -----------------------------------------------------------------------------------


def metrics(**overrides: object) -> GuardMetrics:
    values: dict[str, object] = {"online": True, "faults": 0, "p95_latency_ms": 40.0,
                                 "disagreement_rate": 0.05}
    values.update(overrides)
    return GuardMetrics(**values)  # type: ignore[arg-type]


def test_guards_fire_above_their_ceiling_not_at_it() -> None:
    config = GateConfig(max_disagreement_rate=0.3, max_p95_latency_ms=50.0)
    assert evaluate_guards(metrics(p95_latency_ms=50.0, disagreement_rate=0.3), config) == []
    assert evaluate_guards(metrics(p95_latency_ms=50.01), config) == [
        "p95 latency 50.0 ms exceeds the ceiling of 50.0 ms"
    ]
    assert evaluate_guards(metrics(disagreement_rate=0.3001), config) == [
        "disagreement rate 30.0% exceeds the ceiling of 30.0%"
    ]
    assert evaluate_guards(metrics(online=False, faults=2), config) == [
        "station offline", "2 fault(s) reported"
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [("p95_latency_ms", math.nan), ("p95_latency_ms", math.inf), ("disagreement_rate", math.nan),
     ("faults", -1), ("faults", 1.5)],
)
def test_a_nan_or_impossible_measurement_is_refused_not_read_as_healthy(
    field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        metrics(**{field: value})


@pytest.mark.parametrize(
    "mapping",
    [{"delta": math.nan}, {"alpha": math.nan}, {"beta": math.inf}, {"alpha": 0.0},
     {"beta": 1.0}, {"max_p95_latency_ms": math.nan}, {"max_disagreement_rate": math.inf}],
)
def test_a_gate_config_that_would_make_the_thresholds_meaningless_is_refused(
    mapping: dict[str, float],
) -> None:
    with pytest.raises(ValueError, match=f"^{next(iter(mapping))}:"):
        GateConfig.from_mapping(mapping)


# --- a rollout stage: both gates, min_parts, guards -------------------------------------------

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
FLEET = {"s1": StationView(online=True)}
CANDIDATE = CandidateSpec(
    model=p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64),
    url="http://fleet:8700/bundles/part-classifier/2.0.0/", signature="c2ln",
)


def observing(**gate: object) -> tuple[RolloutState, datetime]:
    plan = parse_plan({"name": "audit", "stages": [
        {"name": "shadow", "stations": ["s1"], "mode": "shadow",
         "exit": {"min_parts": 400, "min_labelled_disagreements": 0, "max_duration_s": 600},
         "gate": {"max_p95_latency_ms": 80, **gate}},
        {"name": "everywhere", "stations": "all", "mode": "promote"},
    ]})
    now = T0
    state = start("r-audit", plan, CANDIDATE, now)
    state, sends = transition(state, Tick(FLEET), now)
    for send in sends:
        now += timedelta(seconds=0.1)
        state, _ = transition(state, CommandAcked(send.cmd_id, send.station, ok=True), now)
    assert state.record.step == StageStep.OBSERVING
    return state, now


def stage_evidence(parts: int, disagreements: int, labelled: int, right: int,
                   p95: float | None = 30.0) -> StageEvidence:
    overall = evidence(parts, disagreements, labelled, right)
    return StageEvidence(overall=overall, escapes=evidence(parts, 0, 0, 0), p95_latency_ms=p95,
                         possible_escapes=disagreements - labelled)


def test_the_stage_passes_at_min_parts_exactly_and_not_one_part_before() -> None:
    # Both gates pass on 399 parts already (60 of 60 labelled disagreements right; no defect
    # disagreement at all), but the stage's min_parts is 400.
    state, now = observing()
    before = stage_evidence(399, 60, 60, 60)
    assert judge(state.current, before).overall.outcome is GateOutcome.PASS
    assert judge(state.current, before).escapes.outcome is GateOutcome.PASS
    held, _ = transition(state, Tick(FLEET, before), now + timedelta(seconds=1))
    assert held.record.step == StageStep.OBSERVING and held.phase == Phase.RUNNING
    passed, _ = transition(state, Tick(FLEET, stage_evidence(400, 60, 60, 60)),
                           now + timedelta(seconds=1))
    assert passed.stage == 1 and passed.stages[0].outcome == "passed"


def test_the_disagreement_guard_counts_from_min_parts_exactly() -> None:
    # Default ceiling 0.3: 121 of 400 is above it; the same rate on 399 parts is not yet judged.
    state, now = observing()
    early, _ = transition(state, Tick(FLEET, stage_evidence(399, 120, 0, 0)),
                          now + timedelta(seconds=1))
    assert early.phase == Phase.RUNNING
    late, _ = transition(state, Tick(FLEET, stage_evidence(400, 121, 0, 0)),
                         now + timedelta(seconds=1))
    assert late.phase == Phase.ROLLING_BACK
    assert "disagreement rate 30.2% exceeds the ceiling of 30.0%" in late.reason


def test_a_slow_candidate_is_rolled_back_whatever_the_gate_says() -> None:
    state, now = observing()
    slow, _ = transition(state, Tick(FLEET, stage_evidence(400, 60, 60, 60, p95=80.5)),
                         now + timedelta(seconds=1))
    assert slow.phase == Phase.ROLLING_BACK and "p95 latency 80.5 ms" in slow.reason


def test_no_evidence_keeps_the_stage_observing_until_it_is_inconclusive() -> None:
    state, now = observing()
    for parts in (0, 400, 100_000):
        later, _ = transition(state, Tick(FLEET, stage_evidence(parts, 0, 0, 0, p95=None)),
                              now + timedelta(seconds=1))
        assert later.phase == Phase.RUNNING and later.record.step == StageStep.OBSERVING
    ended, _ = transition(state, Tick(FLEET, stage_evidence(100_000, 0, 0, 0, p95=None)),
                          now + timedelta(seconds=601))
    assert ended.phase == Phase.PAUSED and "inconclusive" in ended.reason
