"""The gate as the controller uses it: evaluated on every tick, while parts keep coming in.

Between two disagreements the agreed parts pile up, the measured disagreement rate drifts down
and with it p0, so the gate sees more states than one per verdict. These simulations check the
false-promotion rate against alpha at that granularity (one look per part).
"""

from __future__ import annotations

import numpy as np
import pytest

from deploy.gates import GateConfig, GateOutcome, PairedEvidence, evaluate_gate

pytestmark = pytest.mark.unit


def promotions_looking_at_every_part(
    config: GateConfig, disagreement_rate: float, rollouts: int, seed: int,
    horizon: int = 200,
) -> int:
    """Rollouts of a candidate exactly delta worse that the gate promotes, with every
    disagreement labelled at once and the gate evaluated after every part."""
    p_right = 0.5 - config.delta / (2.0 * disagreement_rate)
    rng = np.random.default_rng(seed)
    promoted = 0
    for _ in range(rollouts):
        # Part number of each disagreement, and whether the candidate was right on it.
        at = np.cumsum(rng.geometric(disagreement_rate, size=horizon))
        right = np.cumsum(rng.random(horizon) < p_right)
        outcome = GateOutcome.CONTINUE
        # Below min_labels the gate only continues, so the first look that counts is there.
        for n in range(config.min_labels, horizon):
            k = int(right[n - 1])
            for parts in range(int(at[n - 1]), int(at[n])):
                evidence = PairedEvidence(parts, n, n, k)
                outcome = evaluate_gate(evidence, config).outcome
                if outcome is not GateOutcome.CONTINUE:
                    break
            if outcome is not GateOutcome.CONTINUE:
                break
        promoted += outcome is GateOutcome.PASS
    return promoted


def test_false_promotion_stays_within_alpha_when_d_is_near_delta() -> None:
    # alpha = 0.01 (the setting for safety-relevant defects), d = 1.25 x delta: p0 = 0.1.
    # With d corrected by one standard error only, the gate promoted 65 of these 3000 (2.2%);
    # it now promotes 17, and more than 30 is out of reach by chance (Poisson(17) > 30: ~0.1%).
    config = GateConfig(alpha=0.01)
    promoted = promotions_looking_at_every_part(config, 0.025, rollouts=3000, seed=20240611)
    assert promoted <= config.alpha * 3000


def test_few_parts_below_delta_do_not_pass_on_a_handful_of_labels() -> None:
    # 10 disagreements in 640 parts: d measured at 1.6%, but a true rate of 2.5% (p0 = 0.1)
    # is well within its noise, and 3 right of 10 is no evidence against p = 0.1 at alpha 0.01.
    config = GateConfig(alpha=0.01)
    decision = evaluate_gate(PairedEvidence(640, 10, 10, 3), config)
    assert decision.outcome is GateOutcome.CONTINUE
    # With the rate measured on many parts the same labels do pass: d is then known below delta.
    plentiful = evaluate_gate(PairedEvidence(64_000, 1_000, 10, 3), config)
    assert plentiful.outcome is GateOutcome.PASS
