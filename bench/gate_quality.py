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

Run: .venv/bin/python bench/gate_quality.py [--seed N] [--rollouts N]
The last line printed is JSON for machines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from deploy.gates import (
    P0_FLOOR,
    GateConfig,
    fail_threshold,
    pass_threshold,
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
    summary = {
        "false_promotion": round(worse.gate.promoted, 4),
        "false_rollback": round(equal.gate.rolled_back, 4),
        "labels_vs_fixed": round(labels_vs_fixed, 4),
        "naive_peeking_false_promotion": round(worse.peeking.promoted, 4),
        "fixed_sample_size": size,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
