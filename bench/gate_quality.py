"""How good is the rollout gate? Thousands of simulated rollouts against two baselines.

Every rollout is a stream of parts judged by both models. A part is a disagreement with
probability d; every disagreement gets an operator verdict at once (the fewest parts per label,
so the plug-in disagreement rate the gate uses is as noisy as it gets); the candidate is right on
it with probability p. Three candidates: worse by delta, equal, better by delta.

Rules compared on the same streams:
  gate      deploy.gates (sequential test), checked after every verdict
  fixed     one-sided z-test (McNemar on the discordant pairs) at alpha with power 1 - beta
            against "equal", checked once at its planned sample size
  peeking   the same z-test checked after every verdict up to that size, promoting at the
            first rejection (what a dashboard watcher does with a fixed-sample test)

Then the escaped-defect gate of a rollout stage (deploy.rollout.judge), in two ways:
  partial labelling   only a share of the disagreements gets a verdict, so the count of defect
            disagreements is the labelled defect share scaled up (as the fleet store estimates
            it); the gate against the same gate taking that estimate as a count
  rare-event pass     no labels at all, the pass on a rare disagreement rate looked at after
            every part; the time-uniform bound against the fixed-sample (Bernstein) bound

Run: .venv/bin/python bench/gate_quality.py [--seed N] [--rollouts N]
The last line printed is JSON for machines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from deploy.gates import (
    P0_FLOOR,
    RARE_ALTERNATIVES,
    GateConfig,
    fail_threshold,
    pass_threshold,
    rare_pass,
    worse_by_delta_p,
)

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# The gate is open-ended; ten fixed-sample sizes is far into its tail at the design points.
HORIZON_FACTOR = 10
# Rollouts simulated per numpy block, so memory stays ~100 MB whatever --rollouts says.
BLOCK = 1000


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    disagreement_rate: float  # d
    p_candidate_right: float  # p = P(candidate right | disagreement)

    @property
    def error_diff(self) -> float:
        return self.disagreement_rate * (1.0 - 2.0 * self.p_candidate_right)


def design_scenarios(disagreement_rate: float, delta: float) -> tuple[Scenario, ...]:
    shift = delta / (2.0 * disagreement_rate)
    return (
        Scenario("worse by delta", disagreement_rate, 0.5 - shift),
        Scenario("equal", disagreement_rate, 0.5),
        Scenario("better by delta", disagreement_rate, 0.5 + shift),
    )


@dataclass(frozen=True, slots=True)
class Streams:
    """Cumulative counts after the n-th labelled disagreement (column n - 1), per rollout."""

    candidate_right: IntArray  # (rollouts, horizon)
    parts: IntArray  # (rollouts, horizon): parts judged when the n-th disagreement came


def simulate_streams(
    scenario: Scenario, rollouts: int, horizon: int, rng: np.random.Generator
) -> Streams:
    right = rng.random((rollouts, horizon)) < scenario.p_candidate_right
    # Parts between two disagreements are geometric: the agreed parts in between plus this one.
    gaps = rng.geometric(scenario.disagreement_rate, size=(rollouts, horizon))
    return Streams(
        candidate_right=np.cumsum(right, axis=1, dtype=np.int64),
        parts=np.cumsum(gaps, axis=1, dtype=np.int64),
    )


@dataclass(frozen=True, slots=True)
class RuleResult:
    """Per rollout: promoted, decided within the horizon, labels used to the decision."""

    promoted: BoolArray
    decided: BoolArray
    labels: IntArray


def _labels_axis(streams: Streams) -> IntArray:
    horizon = streams.parts.shape[1]
    return np.arange(1, horizon + 1, dtype=np.int64)


def _worse_by_delta_p(streams: Streams, delta: float) -> FloatArray:
    # Same formula as deploy.gates.worse_by_delta_p, over the whole matrix at once.
    d_hat = _labels_axis(streams)[None, :] / streams.parts
    p0: FloatArray = np.maximum(0.5 - delta / (2.0 * d_hat), P0_FLOOR)
    return p0


def _first_hit(pass_hit: BoolArray, fail_hit: BoolArray) -> RuleResult:
    hit = pass_hit | fail_hit
    decided: BoolArray = np.any(hit, axis=1)
    first = hit.argmax(axis=1)
    rows = np.arange(hit.shape[0])
    promoted = decided & pass_hit[rows, first]
    labels = np.where(decided, first + 1, hit.shape[1]).astype(np.int64)
    return RuleResult(promoted=promoted, decided=decided, labels=labels)


def sequential_gate(streams: Streams, config: GateConfig) -> RuleResult:
    """deploy.gates.evaluate_gate after every verdict, vectorised (tests check they agree)."""
    n = _labels_axis(streams)[None, :]
    k = streams.candidate_right
    p0 = _worse_by_delta_p(streams, config.delta)
    llr = k * np.log(0.5 / p0) + (n - k) * np.log(0.5 / (1.0 - p0))
    # deploy.gates.disagreement_noise_ratio; every disagreement is labelled, so n = disagreements.
    d_hat = n / streams.parts
    se = np.sqrt(d_hat * (1.0 - d_hat) / streams.parts)
    shift = np.zeros_like(p0)
    for z in (1.0, max(1.0, NormalDist().inv_cdf(1.0 - config.alpha))):
        moved = np.maximum(0.5 - config.delta / (2.0 * (d_hat + z * se)), P0_FLOOR)
        shift = np.maximum(shift, (moved - p0) / z)
    noise_ratio = shift**2 * n / (p0 * (1.0 - p0))
    eligible = n >= config.min_labels
    return _first_hit(
        eligible & (llr >= (1.0 + noise_ratio) * pass_threshold(config.alpha)),
        eligible & (llr <= fail_threshold(config.beta)),
    )


def fixed_sample_size(alpha: float, beta: float, p0: float, p1: float = 0.5) -> int:
    """Labels a one-sided z-test of p <= p0 needs for power 1 - beta at p = p1."""
    normal = NormalDist()
    z_a, z_b = normal.inv_cdf(1.0 - alpha), normal.inv_cdf(1.0 - beta)
    root = z_a * math.sqrt(p0 * (1.0 - p0)) + z_b * math.sqrt(p1 * (1.0 - p1))
    return math.ceil((root / (p1 - p0)) ** 2)


def _z_rejects(streams: Streams, config: GateConfig) -> BoolArray:
    n = _labels_axis(streams)[None, :]
    p0 = _worse_by_delta_p(streams, config.delta)
    z = (streams.candidate_right - n * p0) / np.sqrt(n * p0 * (1.0 - p0))
    rejects: BoolArray = z >= NormalDist().inv_cdf(1.0 - config.alpha)
    return rejects


def fixed_test(streams: Streams, config: GateConfig, size: int) -> RuleResult:
    promoted = _z_rejects(streams, config)[:, size - 1]
    rollouts = promoted.shape[0]
    return RuleResult(
        promoted=promoted,
        decided=np.ones(rollouts, dtype=np.bool_),
        labels=np.full(rollouts, size, dtype=np.int64),
    )


def peeking_test(streams: Streams, config: GateConfig, size: int) -> RuleResult:
    n = _labels_axis(streams)[None, :]
    rejects = _z_rejects(streams, config) & (n >= config.min_labels) & (n <= size)
    # Never rejected by the planned size: roll back there, as the fixed test would.
    return _first_hit(rejects, np.broadcast_to(n == size, rejects.shape))


@dataclass(frozen=True, slots=True)
class RuleSummary:
    promoted: float  # share of rollouts
    rolled_back: float
    undecided: float
    mean_labels: float


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    scenario: Scenario
    gate: RuleSummary
    fixed: RuleSummary
    peeking: RuleSummary


def _summarise(results: Sequence[RuleResult]) -> RuleSummary:
    promoted = np.concatenate([r.promoted for r in results])
    decided = np.concatenate([r.decided for r in results])
    labels = np.concatenate([r.labels for r in results])
    return RuleSummary(
        promoted=float(promoted.mean()),
        rolled_back=float((decided & ~promoted).mean()),
        undecided=float((~decided).mean()),
        mean_labels=float(labels.mean()),
    )


def simulate_scenario(
    scenario: Scenario, config: GateConfig, rollouts: int, size: int, rng: np.random.Generator
) -> ScenarioResult:
    horizon = HORIZON_FACTOR * size
    gate: list[RuleResult] = []
    fixed: list[RuleResult] = []
    peeking: list[RuleResult] = []
    for start in range(0, rollouts, BLOCK):
        streams = simulate_streams(scenario, min(BLOCK, rollouts - start), horizon, rng)
        gate.append(sequential_gate(streams, config))
        fixed.append(fixed_test(streams, config, size))
        peeking.append(peeking_test(streams, config, size))
    return ScenarioResult(scenario, _summarise(gate), _summarise(fixed), _summarise(peeking))


def false_promotion_rate(
    config: GateConfig, disagreement_rate: float, rollouts: int, seed: int
) -> float:
    """The gate's promotion rate for a candidate exactly delta worse (used by the unit tests)."""
    worse = design_scenarios(disagreement_rate, config.delta)[0]
    size = fixed_sample_size(
        config.alpha, config.beta, worse_by_delta_p(disagreement_rate, config.delta)
    )
    rng = np.random.default_rng(seed)
    return simulate_scenario(worse, config, rollouts, size, rng).gate.promoted


# Disagreement rates for the sweep, as multiples of delta.
SWEEP_RATIOS = np.array([1.5, 2.0, 3.0, 5.0, 10.0])


@dataclass(frozen=True, slots=True)
class SweepRow:
    disagreement_rate: float
    false_promotion: float
    false_rollback: float
    labels_vs_fixed_worse: float
    labels_vs_fixed_equal: float


def _sweep_row(disagreement_rate: float, config: GateConfig, rollouts: int, seed: int) -> SweepRow:
    worse, equal, _ = design_scenarios(disagreement_rate, config.delta)
    size = fixed_sample_size(
        config.alpha, config.beta, worse_by_delta_p(disagreement_rate, config.delta)
    )
    rng = np.random.default_rng([seed, round(disagreement_rate * 1e6)])
    on_worse = simulate_scenario(worse, config, rollouts, size, rng).gate
    on_equal = simulate_scenario(equal, config, rollouts, size, rng).gate
    return SweepRow(
        disagreement_rate=disagreement_rate,
        false_promotion=on_worse.promoted,
        false_rollback=on_equal.rolled_back,
        labels_vs_fixed_worse=on_worse.mean_labels / size,
        labels_vs_fixed_equal=on_equal.mean_labels / size,
    )


# --- the escaped-defect gate with part of the disagreements labelled ---------------------------

# Disagreements on 10% of parts, 15% of them defects: defect disagreements on 1.5% of parts,
# 1.5 x the default escape_delta of 0.01.
ESCAPE_DISAGREEMENT_RATE = 0.1
ESCAPE_DEFECT_SHARE = 0.15
ESCAPE_DELTA = 0.01
LABELLED_SHARES = (1.0, 0.5, 0.2, 0.1)
# Verdicts per simulated rollout: about 1 in 2000 rollouts needs more than 500.
ESCAPE_HORIZON = 800


@dataclass(frozen=True, slots=True)
class LabelledStreams:
    """Cumulative counts after the n-th verdict (column n - 1), per rollout: a verdict lands
    on a fair sample of the disagreements, `labelled_share` of them."""

    disagreements: IntArray  # all disagreements so far, labelled or not
    parts: IntArray
    defects: IntArray  # labelled disagreements that are defects
    defects_right: IntArray  # of those, the ones the candidate was right on
    candidate_right: IntArray  # labelled disagreements the candidate was right on


def simulate_labelled_streams(
    p_right_on_defects: float, labelled_share: float, rollouts: int, horizon: int,
    rng: np.random.Generator,
) -> LabelledStreams:
    between = rng.geometric(labelled_share, size=(rollouts, horizon))
    agreed = rng.negative_binomial(between, ESCAPE_DISAGREEMENT_RATE)
    defect = rng.random((rollouts, horizon)) < ESCAPE_DEFECT_SHARE
    right = np.where(defect, rng.random((rollouts, horizon)) < p_right_on_defects,
                     rng.random((rollouts, horizon)) < 0.5)
    return LabelledStreams(
        disagreements=np.cumsum(between, axis=1, dtype=np.int64),
        parts=np.cumsum(between + agreed, axis=1, dtype=np.int64),
        defects=np.cumsum(defect, axis=1, dtype=np.int64),
        defects_right=np.cumsum(defect & right, axis=1, dtype=np.int64),
        candidate_right=np.cumsum(right, axis=1, dtype=np.int64),
    )


def _rare_log_evidence(count: IntArray, parts: IntArray, rate: float) -> FloatArray:
    # deploy.gates.rate_log_evidence over the whole matrix at once.
    terms = np.stack([
        count * math.log(r) + (parts - count) * math.log((1.0 - r * rate) / (1.0 - rate))
        for r in RARE_ALTERNATIVES
    ])
    top = terms.max(axis=0)
    evidence: FloatArray = top + np.log(np.exp(terms - top).mean(axis=0))
    return evidence


def escape_gate(
    streams: LabelledStreams, config: GateConfig, *, labelling_noise: bool = True
) -> RuleResult:
    """The escape gate of deploy.rollout.judge after every verdict, vectorised (tests check they
    agree). `labelling_noise=False` takes the scaled-up count of defect disagreements as if it
    had been counted: the gate before that noise was accounted for."""
    labelled = _labels_axis_of(streams.parts)[None, :]
    unlabelled = streams.disagreements - labelled
    n, k, parts = streams.defects, streams.defects_right, streams.parts
    # deploy.fleet_store.SqliteFleetStore.paired_evidence: the estimate and the bound.
    estimated = n + np.round(unlabelled * n / labelled).astype(np.int64)
    possible = n + unlabelled
    d_hat = estimated / parts
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(d_hat > 0.0, np.maximum(0.5 - config.delta / (2.0 * d_hat), P0_FLOOR),
                      P0_FLOOR)
        llr = k * np.log(0.5 / p0) + (n - k) * np.log(0.5 / (1.0 - p0))
        # deploy.gates.disagreement_rate_variance and disagreement_noise_ratio.
        variance = d_hat * (1.0 - d_hat) / parts
        if labelling_noise:
            share = n / labelled
            rate = streams.disagreements / parts
            variance = variance + rate**2 * share * (1.0 - share) * (
                1.0 / labelled - 1.0 / streams.disagreements
            )
        se = np.sqrt(variance)
        shift = np.zeros_like(p0)
        for z in (1.0, max(1.0, NormalDist().inv_cdf(1.0 - config.alpha))):
            moved = np.maximum(0.5 - config.delta / (2.0 * (d_hat + z * se)), P0_FLOOR)
            shift = np.maximum(shift, (moved - p0) / z)
        noise_ratio = np.where(n > 0, shift**2 * n / (p0 * (1.0 - p0)), 0.0)
    eligible = n >= config.min_labels
    sequential_pass = eligible & (llr >= (1.0 + noise_ratio) * pass_threshold(config.alpha))
    sequential_fail = eligible & (llr <= fail_threshold(config.beta))
    rare = _rare_log_evidence(possible, parts, config.delta) >= math.log(1.0 / config.alpha)
    return _first_hit(sequential_pass | (rare & ~sequential_fail), sequential_fail)


def _labels_axis_of(matrix: IntArray) -> IntArray:
    return np.arange(1, matrix.shape[1] + 1, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class EscapeRow:
    labelled_share: float
    false_promotion: float  # worse by escape_delta, promoted
    false_promotion_as_counted: float  # the same, with the estimate taken as a count
    equal_promoted: float  # an equal candidate, promoted
    equal_promoted_as_counted: float
    equal_labels: float  # verdicts to a decision on the equal candidate
    equal_labels_as_counted: float


def escape_config(alpha: float, beta: float, min_labels: int) -> GateConfig:
    # What deploy.rollout.judge gives the escape gate: escape_delta, and half the plan's beta.
    return GateConfig(delta=ESCAPE_DELTA, alpha=alpha, beta=beta / 2, min_labels=min_labels)


def _escape_row(
    labelled_share: float, config: GateConfig, rollouts: int, seed: int
) -> EscapeRow:
    defect_rate = ESCAPE_DISAGREEMENT_RATE * ESCAPE_DEFECT_SHARE
    results: list[tuple[RuleSummary, RuleSummary]] = []
    for p_right in (0.5 - config.delta / (2.0 * defect_rate), 0.5):
        rng = np.random.default_rng([seed, round(labelled_share * 100), round(p_right * 1000)])
        noisy: list[RuleResult] = []
        counted: list[RuleResult] = []
        for start in range(0, rollouts, BLOCK):
            streams = simulate_labelled_streams(
                p_right, labelled_share, min(BLOCK, rollouts - start), ESCAPE_HORIZON, rng
            )
            noisy.append(escape_gate(streams, config))
            counted.append(escape_gate(streams, config, labelling_noise=False))
        results.append((_summarise(noisy), _summarise(counted)))
    (worse, worse_counted), (equal, equal_counted) = results
    return EscapeRow(
        labelled_share=labelled_share,
        false_promotion=worse.promoted,
        false_promotion_as_counted=worse_counted.promoted,
        equal_promoted=equal.promoted,
        equal_promoted_as_counted=equal_counted.promoted,
        equal_labels=equal.mean_labels,
        equal_labels_as_counted=equal_counted.mean_labels,
    )


# --- the rare-event pass, looked at after every part ------------------------------------------

RARE_PARTS = 200_000
# Ville's bound is nearly exact for this pass (the evidence crosses 1/alpha with almost no
# overshoot), so its false-pass rate sits just under alpha: many rollouts to show it.
RARE_ROLLOUTS_FACTOR = 5
RARE_RATIOS = (0.0, 0.1, 0.25, 0.5)  # disagreement rates for the parts-to-pass figures, x delta


def bernstein_pass(count: int, parts: int, config: GateConfig) -> bool:
    """The fixed-sample bound the rare-event pass used before: (k + c + sqrt(2 k c)) / n with
    c = log(1/alpha), at or below delta. Valid for one look only."""
    c = math.log(1.0 / config.alpha)
    return (count + c + math.sqrt(2.0 * count * c)) / parts <= config.delta


PassRule = Callable[[int, int, GateConfig], bool]


def first_passing_parts(rule: PassRule, most: int, limit: int, config: GateConfig) -> IntArray:
    """For k = 0..most disagreements, the fewest parts at which `rule` passes (limit + 1: not
    within `limit`). Both rules only get easier with more parts at the same count."""
    first = np.full(most + 1, limit + 1, dtype=np.int64)
    for k in range(most + 1):
        low, high = max(k, 1), limit + 1
        if not rule(k, limit, config):
            continue
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if rule(k, middle, config) else (middle + 1, high)
        first[k] = low
    return first


@dataclass(frozen=True, slots=True)
class RarePasses:
    passed: float  # share of rollouts passed within the parts simulated
    median_parts: float  # parts to the pass, median over rollouts (inf: most never pass)


def rare_passes(
    rule: PassRule, rate: float, config: GateConfig, rollouts: int, parts: int,
    rng: np.random.Generator,
) -> RarePasses:
    """Rollouts whose disagreements come at `rate` per part that the rare-event pass passes,
    looked at after every part (exactly: at a fixed count the pass gets easier with every part,
    so the last part before each new disagreement is the one to look at)."""
    most = int(parts * rate + 10.0 * math.sqrt(parts * rate) + 10)
    first = first_passing_parts(rule, most, parts, config)
    when = np.concatenate([
        _first_pass_parts(first, rate, min(BLOCK, rollouts - start), parts, rng)
        for start in range(0, rollouts, BLOCK)
    ])
    return RarePasses(
        passed=float(np.isfinite(when).mean()), median_parts=float(np.median(when))
    )


def _first_pass_parts(
    first: IntArray, rate: float, rollouts: int, parts: int, rng: np.random.Generator
) -> FloatArray:
    """Per rollout, the part at which the pass comes (inf: none within `parts`)."""
    columns = first.shape[0]
    if rate > 0.0:
        arrival = np.cumsum(rng.geometric(rate, size=(rollouts, columns)), axis=1)
    else:
        arrival = np.full((rollouts, columns), parts + 1, dtype=np.int64)
    if (arrival[:, -1] <= parts).any():
        raise RuntimeError("simulate more disagreements per rollout")
    since = np.concatenate([np.zeros((rollouts, 1), dtype=np.int64), arrival[:, :-1]], axis=1)
    hit = first[None, :] <= np.minimum(arrival - 1, parts)
    rows = np.arange(rollouts)
    column = hit.argmax(axis=1)
    when = np.maximum(first[column], since[rows, column]).astype(np.float64)
    passed_at: FloatArray = np.where(hit.any(axis=1), when, np.inf)
    return passed_at


@dataclass(frozen=True, slots=True)
class RareRow:
    ratio: float  # disagreement rate / delta
    uniform: RarePasses
    fixed: RarePasses


def rare_rows(config: GateConfig, rollouts: int, seed: int) -> list[RareRow]:
    rows = []
    for ratio in (1.0, *RARE_RATIOS):
        outcomes = [
            rare_passes(rule, ratio * config.delta, config, rollouts, RARE_PARTS,
                        np.random.default_rng([seed, round(ratio * 100)]))
            for rule in (rare_pass, bernstein_pass)
        ]
        rows.append(RareRow(ratio, *outcomes))
    return rows


def _table(results: Sequence[ScenarioResult], size: int) -> str:
    header = (
        f"{'scenario':<16} {'d':>5} {'p':>5} {'err diff':>9} {'rule':<8} {'promoted':>9} "
        f"{'rolled back':>12} {'undecided':>10} {'mean labels':>12} {'vs fixed':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        s = result.scenario
        for name, rule in (("gate", result.gate), ("fixed", result.fixed),
                           ("peeking", result.peeking)):
            lines.append(
                f"{s.name:<16} {s.disagreement_rate:>5.2f} {s.p_candidate_right:>5.2f} "
                f"{s.error_diff:>+9.3f} {name:<8} {rule.promoted:>9.3f} "
                f"{rule.rolled_back:>12.3f} {rule.undecided:>10.3f} "
                f"{rule.mean_labels:>12.1f} {rule.mean_labels / size:>9.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = GateConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--rollouts", type=int, default=4000, help="per scenario")
    parser.add_argument("--disagreement-rate", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=defaults.delta)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--min-labels", type=int, default=defaults.min_labels)
    args = parser.parse_args(argv)
    if args.rollouts < 1:
        parser.error("--rollouts must be >= 1")
    if not 0.0 < args.disagreement_rate <= 1.0 or args.disagreement_rate <= args.delta:
        parser.error("--disagreement-rate must be in (delta, 1]")
    config = GateConfig(
        delta=args.delta, alpha=args.alpha, beta=args.beta, min_labels=args.min_labels
    )
    p0 = worse_by_delta_p(args.disagreement_rate, config.delta)
    size = fixed_sample_size(config.alpha, config.beta, p0)
    seeds = np.random.SeedSequence(args.seed).spawn(3)
    scenarios = design_scenarios(args.disagreement_rate, config.delta)
    results = [
        simulate_scenario(s, config, args.rollouts, size, np.random.default_rng(seed))
        for s, seed in zip(scenarios, seeds, strict=True)
    ]
    worse, equal, _ = results
    sweep = [
        _sweep_row(d, config, max(args.rollouts // 2, 1), args.seed)
        for d in SWEEP_RATIOS * config.delta
    ]
    labels_vs_fixed = float(np.mean([r.gate.mean_labels for r in results])) / size

    print(
        f"gate quality: {args.rollouts} rollouts per scenario, seed {args.seed}; "
        f"delta={config.delta}, alpha={config.alpha}, beta={config.beta}, "
        f"min_labels={config.min_labels}"
    )
    print(
        f"worse by delta means p <= {p0:.3f} at d = {args.disagreement_rate}; "
        f"fixed-sample test plans {size} labelled disagreements; "
        f"horizon {HORIZON_FACTOR * size}"
    )
    print()
    print(_table(results, size))
    print("the gate across disagreement rates (worse by delta and equal; half the rollouts):")
    print(f"{'d':>6} {'d/delta':>8} {'false promotion':>16} {'false rollback':>15} "
          f"{'labels vs fixed (worse, equal)':>31}")
    for row in sweep:
        print(
            f"{row.disagreement_rate:>6.3f} {row.disagreement_rate / config.delta:>8.1f} "
            f"{row.false_promotion:>16.3f} {row.false_rollback:>15.3f} "
            f"{row.labels_vs_fixed_worse:>15.2f}, {row.labels_vs_fixed_equal:.2f}"
        )
    print()
    print(
        f"gate: false promotion {worse.gate.promoted:.3f} (target <= {config.alpha}), "
        f"false rollback {equal.gate.rolled_back:.3f} (target <= {config.beta}), "
        f"mean labels {labels_vs_fixed:.2f} x fixed (mean of the three scenarios; "
        f"target <= 0.7); peeking false promotion {worse.peeking.promoted:.3f}"
    )
    escape = escape_config(config.alpha, config.beta, config.min_labels)
    escape_rows = [_escape_row(share, escape, args.rollouts, args.seed)
                   for share in LABELLED_SHARES]
    print()
    print(
        f"escaped-defect gate as a stage judges it (escape_delta {ESCAPE_DELTA}, beta "
        f"{escape.beta:g}): disagreements on {ESCAPE_DISAGREEMENT_RATE:.0%} of parts, "
        f"{ESCAPE_DEFECT_SHARE:.0%} of them defects; a fair sample of them labelled"
    )
    print(f"{'labelled':>9} {'false promotion':>26} {'equal promoted':>26} "
          f"{'verdicts (equal)':>26}")
    print(f"{'':>9} {'gate':>12} {'as counted':>13} {'gate':>12} {'as counted':>13} "
          f"{'gate':>12} {'as counted':>13}")
    for e in escape_rows:
        print(
            f"{e.labelled_share:>9.0%} {e.false_promotion:>12.3f} "
            f"{e.false_promotion_as_counted:>13.3f} {e.equal_promoted:>12.3f} "
            f"{e.equal_promoted_as_counted:>13.3f} {e.equal_labels:>12.1f} "
            f"{e.equal_labels_as_counted:>13.1f}"
        )
    rare = rare_rows(escape, RARE_ROLLOUTS_FACTOR * args.rollouts, args.seed)
    print()
    print(
        f"rare-event pass with no labels, looked at after every part for {RARE_PARTS} parts "
        f"(delta {ESCAPE_DELTA}, alpha {escape.alpha:g}; {RARE_ROLLOUTS_FACTOR * args.rollouts} "
        f"rollouts): share passed and median parts to pass"
    )
    print(f"{'rate/delta':>10} {'time-uniform':>22} {'fixed-sample bound':>24}")
    for rare_row in rare:
        uniform, fixed = rare_row.uniform, rare_row.fixed
        print(
            f"{rare_row.ratio:>10.2f} {uniform.passed:>10.3f} {uniform.median_parts:>11.0f} "
            f"{fixed.passed:>12.3f} {fixed.median_parts:>11.0f}"
        )
    worst = next(e for e in escape_rows if e.labelled_share == 0.2)
    summary = {
        "false_promotion": round(worse.gate.promoted, 4),
        "false_rollback": round(equal.gate.rolled_back, 4),
        "labels_vs_fixed": round(labels_vs_fixed, 4),
        "naive_peeking_false_promotion": round(worse.peeking.promoted, 4),
        "fixed_sample_size": size,
        "escape_false_promotion_20pct_labelled": round(worst.false_promotion, 4),
        "escape_false_promotion_20pct_labelled_as_counted": round(
            worst.false_promotion_as_counted, 4
        ),
        "rare_pass_false_pass_every_part": round(rare[0].uniform.passed, 4),
        "rare_pass_false_pass_every_part_fixed_sample": round(rare[0].fixed.passed, 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
