"""Rollout gate: a sequential test on paired outcomes, plus the station guards.

The candidate runs beside the active model on the same parts. On a labelled disagreement (binary
labels) exactly one of the two is right, so with d the disagreement rate and p the probability
that the candidate is the one that is right,

    err(candidate) - err(active) = d * (1 - 2p).

"Worse by at least delta" is then p <= p0 = 1/2 - delta / (2d), and "not worse" is p >= 1/2.
The gate is Wald's sequential probability ratio test of p = p0 against p = 1/2 on the stream of
labelled disagreements, with Ville's thresholds 1/alpha and 1/beta instead of Wald's
approximations, so both error rates hold however often it is evaluated. p0 is computed from the
observed disagreement rate; the pass threshold is raised by the share of noise that estimate adds,
which kept the false-promotion rate within alpha in bench/gate_quality.py even when few parts
had been seen (the guarantee is exact only for a known disagreement rate). The escaped-defect
gate's disagreement count is itself scaled up from the labelled defect share when not every
disagreement is labelled (`estimated_from`); the noise of that share is added to it.

`evaluate_rare_gate` also passes when the models disagree too rarely to differ by delta, on a
time-uniform upper bound on that rate (a mixture of likelihood ratios, with Ville's threshold),
so that pass too holds however often it is looked at.
See docs/gates.md and docs/decisions/0002-sequential-gate.md.

Everything here is pure: counts in, decision out. The controller calls `evaluate_gate` on every
tick (after every verdict and every part in between) and `evaluate_guards` on every metrics
report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from statistics import NormalDist
from typing import Any

__all__ = [
    "P0_FLOOR",
    "RARE_ALTERNATIVES",
    "GateConfig",
    "GateDecision",
    "GateOutcome",
    "GuardMetrics",
    "PairedEvidence",
    "disagreement_noise_ratio",
    "disagreement_rate_upper",
    "disagreement_rate_variance",
    "error_diff_upper_bound",
    "evaluate_gate",
    "evaluate_guards",
    "evaluate_rare_gate",
    "fail_threshold",
    "log_likelihood_ratio",
    "pass_threshold",
    "rare_pass",
    "rate_log_evidence",
    "worse_by_delta_p",
]

# When d <= delta no candidate can be worse by delta; we still test against one that is right on
# only 1% of disagreements, so a run of wrong verdicts can fail it instead of passing by default.
P0_FLOOR = 0.01

# Bisection on the confidence bound: 60 halvings of (0, 1/2] is below double precision.
_BISECTION_STEPS = 60

# The rare-event pass tests "the disagreement rate is at least q" against these fractions of q,
# mixed with equal weights: from no disagreement to a rate of q / 2 it needs at most about a
# quarter more parts than the fixed-sample bound it replaced (bench/gate_quality.py,
# docs/gates.md).
RARE_ALTERNATIVES = (1 / 2, 1 / 4, 1 / 8, 1 / 16)


def _require_number(name: str, value: object) -> float:
    # bool is an int subclass; "alpha: true" in a plan is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return number


def _require_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class GateConfig:
    """What a stage's gate tolerates; one per stage of a rollout plan."""

    delta: float = 0.02  # tolerated increase in error rate (absolute)
    alpha: float = 0.05  # max false-promotion rate (candidate worse by >= delta promoted)
    beta: float = 0.2  # max false-rollback rate for a candidate that is not worse
    min_labels: int = 10  # never decide on fewer labelled disagreements
    # guard: the models differ on too many parts (a plan's default too)
    max_disagreement_rate: float | None = 0.3
    max_p95_latency_ms: float | None = None  # guard: candidate too slow for the line

    def __post_init__(self) -> None:
        delta = _require_number("delta", self.delta)
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta: must be in (0, 1), got {self.delta}")
        for name in ("alpha", "beta"):
            rate = _require_number(name, getattr(self, name))
            if not 0.0 < rate < 1.0:
                raise ValueError(f"{name}: must be in (0, 1), got {rate}")
        if isinstance(self.min_labels, bool) or not isinstance(self.min_labels, int):
            raise ValueError(f"min_labels: expected an integer, got {self.min_labels!r}")
        if self.min_labels < 1:
            raise ValueError(f"min_labels: must be >= 1, got {self.min_labels}")
        if self.max_disagreement_rate is not None:
            ceiling = _require_number("max_disagreement_rate", self.max_disagreement_rate)
            if not 0.0 < ceiling <= 1.0:
                raise ValueError(f"max_disagreement_rate: must be in (0, 1], got {ceiling}")
        if self.max_p95_latency_ms is not None:
            latency = _require_number("max_p95_latency_ms", self.max_p95_latency_ms)
            if latency <= 0.0:
                raise ValueError(f"max_p95_latency_ms: must be > 0, got {latency}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GateConfig:
        """Build from a plan's `gate:` mapping; unknown keys are errors, not silent defaults."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(
                    f"{key}: unknown gate setting (known: {', '.join(sorted(known))})"
                )
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "min_labels":
                kwargs[key] = value  # __post_init__ checks type and range
            elif value is None and key in ("max_disagreement_rate", "max_p95_latency_ms"):
                kwargs[key] = None
            else:
                kwargs[key] = _require_number(key, value)
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class PairedEvidence:
    """Counts from parts that both models judged, as the controller has them right now."""

    parts: int  # parts both models judged
    disagreements: int  # of those, where their labels differ
    labelled_disagreements: int  # disagreements with an operator verdict
    candidate_right: int  # labelled disagreements where the candidate matched the verdict

    def __post_init__(self) -> None:
        for f in fields(self):
            _require_count(f.name, getattr(self, f.name))
        if self.disagreements > self.parts:
            raise ValueError(
                f"disagreements: {self.disagreements} exceeds parts ({self.parts})"
            )
        if self.labelled_disagreements > self.disagreements:
            raise ValueError(
                f"labelled_disagreements: {self.labelled_disagreements} exceeds "
                f"disagreements ({self.disagreements})"
            )
        if self.candidate_right > self.labelled_disagreements:
            raise ValueError(
                f"candidate_right: {self.candidate_right} exceeds "
                f"labelled_disagreements ({self.labelled_disagreements})"
            )


class GateOutcome(StrEnum):
    PASS = "pass"  # noqa: S105 -- a gate outcome, not a credential
    FAIL = "fail"
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class GateDecision:
    outcome: GateOutcome
    reason: str  # shown on the dashboard and in the rollout's end state
    error_diff_estimate: float | None  # estimated err(candidate) - err(active)
    error_diff_upper: float | None  # always-valid upper bound at 1 - alpha
    llr: float | None  # log likelihood ratio, "not worse" over "worse by delta"


@dataclass(frozen=True, slots=True)
class GuardMetrics:
    online: bool
    faults: int
    p95_latency_ms: float | None
    disagreement_rate: float | None

    def __post_init__(self) -> None:
        _require_count("faults", self.faults)
        if self.p95_latency_ms is not None:
            if _require_number("p95_latency_ms", self.p95_latency_ms) < 0.0:
                raise ValueError(f"p95_latency_ms: must be >= 0, got {self.p95_latency_ms}")
        if self.disagreement_rate is not None:
            rate = _require_number("disagreement_rate", self.disagreement_rate)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"disagreement_rate: must be in [0, 1], got {rate}")


def worse_by_delta_p(disagreement_rate: float, delta: float) -> float:
    """P(candidate right | disagreement) at which the candidate is exactly delta worse."""
    if disagreement_rate <= 0.0:
        return P0_FLOOR
    return max(0.5 - delta / (2.0 * disagreement_rate), P0_FLOOR)


def log_likelihood_ratio(candidate_right: int, labelled: int, p0: float) -> float:
    """log of L(p = 1/2) / L(p = p0) over the labelled disagreements; > 0 favours the candidate."""
    wrong = labelled - candidate_right
    return candidate_right * math.log(0.5 / p0) + wrong * math.log(0.5 / (1.0 - p0))


def disagreement_rate_variance(
    evidence: PairedEvidence, estimated_from: PairedEvidence | None = None
) -> float:
    """Variance of the measured disagreement rate d = disagreements / parts (parts > 0).

    Counted on every part, it is binomial: d (1 - d) / parts. With `estimated_from`, the count
    was not counted but estimated: the labelled share s = labelled / L among the L labelled of
    all D disagreements in `estimated_from`, scaled up to all D (what the escaped-defect gate
    gets when verdicts lag behind). Those L are a sample of the D, so the estimate adds the
    sampling variance of s, scaled by the rate of all disagreements D / parts:
    (D / parts)^2 s (1 - s) (1/L - 1/D) -- nothing once every disagreement is labelled.
    """
    d = evidence.disagreements / evidence.parts
    variance = d * (1.0 - d) / evidence.parts
    if estimated_from is None:
        return variance
    labelled, drawn_from = evidence.labelled_disagreements, estimated_from.labelled_disagreements
    if labelled > drawn_from:
        raise ValueError(
            f"estimated_from: {labelled} labelled disagreements cannot be a share of "
            f"{drawn_from} labelled ones"
        )
    if drawn_from == 0:
        return variance
    share = labelled / drawn_from
    rate = estimated_from.disagreements / estimated_from.parts
    sampling = 1.0 / drawn_from - 1.0 / estimated_from.disagreements
    return variance + rate**2 * share * (1.0 - share) * sampling


def disagreement_noise_ratio(
    evidence: PairedEvidence,
    delta: float,
    alpha: float,
    estimated_from: PairedEvidence | None = None,
) -> float:
    """Variance of p0 from the estimated disagreement rate, relative to that of the labels.

    p0 = 1/2 - delta / (2d) is computed from d = disagreements / parts, itself an estimate with
    standard error sqrt(d (1 - d) / parts), or more when the count of disagreements was scaled
    up from a labelled share (`disagreement_rate_variance`). We move d up (the direction that
    would hide a worse candidate) and compare the shift in p0 per standard error, squared, with
    the variance p0 (1 - p0) / n of the labelled share. A finite difference rather than a
    derivative, so the 1% floor on p0 (d near or below delta) is respected. One standard error
    alone sees no shift when d and d + 1 SE both sit on the floor, though a true d above delta
    is then well within the noise; so d is also moved by z_alpha standard errors and the larger
    shift per standard error is taken. Near 0 when parts are plentiful and every disagreement
    is counted; with an estimated count it stays as large as the labelled share is uncertain.
    """
    n, parts = evidence.labelled_disagreements, evidence.parts
    if n == 0 or parts == 0:
        return 0.0
    d = evidence.disagreements / parts
    p0 = worse_by_delta_p(d, delta)
    se = math.sqrt(disagreement_rate_variance(evidence, estimated_from))
    steps = (1.0, max(1.0, NormalDist().inv_cdf(1.0 - alpha)))
    shift = max((worse_by_delta_p(d + z * se, delta) - p0) / z for z in steps)
    return shift**2 * n / (p0 * (1.0 - p0))


def pass_threshold(alpha: float, noise_ratio: float = 0.0) -> float:
    # Ville: under p <= p0 the ratio is a nonnegative supermartingale, so it ever reaching
    # 1/alpha has probability <= alpha, at every look. When p0 is itself estimated, the log
    # ratio is spread wider by (1 + noise_ratio); the threshold scales with it.
    return (1.0 + noise_ratio) * math.log(1.0 / alpha)


def fail_threshold(beta: float) -> float:
    # Same argument with the roles swapped: under p >= 1/2, P(ratio ever <= beta) <= beta.
    # "Not worse" (p = 1/2) does not depend on d, so no correction is needed here.
    return -math.log(1.0 / beta)


def error_diff_upper_bound(
    evidence: PairedEvidence,
    config: GateConfig,
    *,
    estimated_from: PairedEvidence | None = None,
) -> float | None:
    """Upper bound on err(candidate) - err(active) at 1 - alpha, valid at every look at once
    (exactly for a known disagreement rate; with the noise correction otherwise;
    `estimated_from` as in `disagreement_rate_variance`).

    It inverts the pass rule: the confidence set for p is every p' for which the ratio
    L(1/2) / L(p') has not reached the pass threshold. So the gate passes exactly when this
    bound is at or below delta. It is built to answer "worse by delta?", so it never goes
    below 0: it does not certify an improvement (the estimate shows that).
    """
    n, k = evidence.labelled_disagreements, evidence.candidate_right
    if n == 0 or evidence.parts == 0:
        return None
    d = evidence.disagreements / evidence.parts
    if k == 0:
        return d  # no p' is excluded: the candidate may be wrong on every disagreement
    noise_ratio = disagreement_noise_ratio(
        evidence, config.delta, config.alpha, estimated_from
    )
    bound = pass_threshold(config.alpha, noise_ratio)
    # log L(1/2)/L(p') falls as p' rises towards min(k/n, 1/2); find where it meets the bound.
    low, high = 0.0, min(k / n, 0.5)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if mid <= 0.0 or log_likelihood_ratio(k, n, mid) >= bound:
            low = mid
        else:
            high = mid
    return d * (1.0 - 2.0 * high)


def evaluate_gate(
    evidence: PairedEvidence,
    config: GateConfig,
    *,
    estimated_from: PairedEvidence | None = None,
) -> GateDecision:
    """Pass, fail or keep collecting; safe to call after every verdict.

    `estimated_from`: the disagreements `evidence.disagreements` was scaled up from, when it is
    a labelled share of them rather than a count (see `disagreement_rate_variance`).

    The disagreement-rate and latency ceilings are guards (`evaluate_guards`), not part of this
    test, so a rollout reports each failure once and for the reason it happened.
    """
    n, k = evidence.labelled_disagreements, evidence.candidate_right
    if evidence.parts == 0 or n == 0:
        return GateDecision(
            GateOutcome.CONTINUE,
            f"waiting for labelled disagreements (0 of at least {config.min_labels})",
            None,
            None,
            None,
        )
    d = evidence.disagreements / evidence.parts
    p0 = worse_by_delta_p(d, config.delta)
    llr = log_likelihood_ratio(k, n, p0)
    estimate = d * (1.0 - 2.0 * k / n)
    upper = error_diff_upper_bound(evidence, config, estimated_from=estimated_from)
    noise_ratio = disagreement_noise_ratio(
        evidence, config.delta, config.alpha, estimated_from
    )
    summary = (
        f"candidate right on {k} of {n} labelled disagreements; disagreement rate {d:.2%}; "
        f"error difference {estimate:+.2%} (upper bound {upper:+.2%})"
    )
    if n < config.min_labels:
        return GateDecision(
            GateOutcome.CONTINUE,
            f"{summary}; waiting for at least {config.min_labels} labelled disagreements",
            estimate,
            upper,
            llr,
        )
    if llr >= pass_threshold(config.alpha, noise_ratio):
        reason = (
            f"pass: {summary}; not worse by {config.delta:.2%} "
            f"at false-promotion rate {config.alpha:g}"
        )
        return GateDecision(GateOutcome.PASS, reason, estimate, upper, llr)
    if llr <= fail_threshold(config.beta):
        reason = (
            f"fail: {summary}; evidence favours a candidate worse by {config.delta:.2%} "
            f"(false-rollback rate {config.beta:g})"
        )
        return GateDecision(GateOutcome.FAIL, reason, estimate, upper, llr)
    return GateDecision(
        GateOutcome.CONTINUE, f"{summary}; not yet conclusive", estimate, upper, llr
    )


def rate_log_evidence(count: int, parts: int, rate: float) -> float:
    """log of the evidence, from `count` events in `parts` trials, that the event rate is below
    `rate` (0 < rate <= 1): the mean over the alternatives r * rate (`RARE_ALTERNATIVES`) of the
    Bernoulli likelihood ratio L(r * rate) / L(rate).

    Under any rate at or above `rate` each ratio, and so their mean, is a nonnegative
    supermartingale starting at 1 (one event multiplies it by r, one non-event by
    (1 - r * rate) / (1 - rate), and their expectation is at most 1). By Ville's inequality it
    ever reaches 1/alpha with probability at most alpha, however many parts it is watched over.
    More events lower it, more parts raise it, and it grows with `rate`.
    """
    quiet = parts - count
    if quiet == 0:
        terms = [count * math.log(r) for r in RARE_ALTERNATIVES]
    elif rate >= 1.0:
        return math.inf  # a part without the event rules out a rate of 1
    else:
        terms = [
            count * math.log(r) + quiet * math.log((1.0 - r * rate) / (1.0 - rate))
            for r in RARE_ALTERNATIVES
        ]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms) / len(terms))


def disagreement_rate_upper(disagreements: int, parts: int, alpha: float) -> float:
    """A time-uniform upper confidence bound on a (rare) disagreement rate at 1 - alpha.

    The smallest rate whose `rate_log_evidence` has reached log(1/alpha): every rate from there
    up is rejected, so the true rate is above the bound, at any look of a stream however often
    it is looked at, with probability at most alpha. It is conservative when `disagreements`
    counts more than there are (more events only lower the evidence).

    |err(candidate) - err(active)| can never exceed the disagreement rate, so when this bound is
    at or below delta the candidate cannot be worse by delta, however the disagreements are
    labelled.
    """
    if parts <= 0 or disagreements >= parts:
        return 1.0
    threshold = math.log(1.0 / alpha)
    # The evidence grows with the rate: near 0 it is at most 1, towards 1 it is unbounded.
    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if rate_log_evidence(disagreements, parts, mid) >= threshold:
            high = mid
        else:
            low = mid
    return high


def rare_pass(count: int, parts: int, config: GateConfig) -> bool:
    """Whether `count` disagreements in `parts` show a rate below delta, at any look: exactly
    when `disagreement_rate_upper` is at or below delta."""
    if parts <= 0 or count >= parts:
        return False
    return rate_log_evidence(count, parts, config.delta) >= math.log(1.0 / config.alpha)


def evaluate_rare_gate(
    evidence: PairedEvidence,
    config: GateConfig,
    possible: int | None = None,
    *,
    estimated_from: PairedEvidence | None = None,
) -> GateDecision:
    """`evaluate_gate`, plus a pass when the models disagree too rarely to differ by delta:
    used for escaped defects, where disagreements may be too rare ever to reach min_labels.
    `possible` is a count of such disagreements that cannot be too low (every unlabelled one
    counted); without it, `evidence.disagreements`. `estimated_from` as in `evaluate_gate`.
    The rare-event pass uses a time-uniform bound (`disagreement_rate_upper`), so it holds
    however often it is evaluated; the bound shown with it is that bound on the rate."""
    decision = evaluate_gate(evidence, config, estimated_from=estimated_from)
    if decision.outcome != GateOutcome.CONTINUE:
        return decision
    count = evidence.disagreements if possible is None else possible
    if not rare_pass(count, evidence.parts, config):
        return decision
    # delta's own evidence has reached the threshold, so delta is an upper bound too.
    upper = min(disagreement_rate_upper(count, evidence.parts, config.alpha), config.delta)
    reason = (
        f"pass: the models disagree on at most {upper:.2%} of parts ({count} "
        f"of {evidence.parts}), so they cannot differ by {config.delta:.2%}"
    )
    return GateDecision(GateOutcome.PASS, reason, decision.error_diff_estimate, upper,
                        decision.llr)


def evaluate_guards(metrics: GuardMetrics, config: GateConfig) -> list[str]:
    """Human-readable guard failures for one station; an empty list means all good."""
    failures: list[str] = []
    if not metrics.online:
        failures.append("station offline")
    if metrics.faults > 0:
        failures.append(f"{metrics.faults} fault(s) reported")
    if (
        config.max_p95_latency_ms is not None
        and metrics.p95_latency_ms is not None
        and metrics.p95_latency_ms > config.max_p95_latency_ms
    ):
        failures.append(
            f"p95 latency {metrics.p95_latency_ms:.1f} ms exceeds the ceiling of "
            f"{config.max_p95_latency_ms:.1f} ms"
        )
    if (
        config.max_disagreement_rate is not None
        and metrics.disagreement_rate is not None
        and metrics.disagreement_rate > config.max_disagreement_rate
    ):
        failures.append(
            f"disagreement rate {metrics.disagreement_rate:.1%} exceeds the ceiling of "
            f"{config.max_disagreement_rate:.1%}"
        )
    return failures
