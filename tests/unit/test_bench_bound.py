"""The agent benchmark's pure parts: the bound on pairs / raw for an agent that cost nothing,
and the search for the highest line rate held with the candidate on every part."""

from __future__ import annotations

import pytest

from bench.agent_throughput import PipelineRun, keeps_up, ratio_bound, sustained_rate

pytestmark = pytest.mark.unit


def shadow_run(parts: float, pairs: float, cores: dict[str, float]) -> PipelineRun:
    return PipelineRun(
        pairs_per_s=pairs, parts_per_s=parts, skipped_per_s=parts - pairs, active_p50_ms=0.2,
        active_p99_ms=3.0, active_p999_ms=6.0, outbox_depth_at_end=0, owed_after_shutdown=0,
        delivered=0, cores=cores,
    )


def test_the_bound_charges_each_pair_its_models_and_two_messages() -> None:
    # 1,250 messages/s on 0.25 helper cores: 0.2 ms a message; a pair costs 1.0 + 2 x 0.2 ms.
    run = shadow_run(1000, 250, {"agent": 1.2, "relay": 0.2, "broker": 0.05, "receipter": 0.2})
    helper_ms, bound = ratio_bound(run, model_ms_per_pair=1.0, raw_pairs_per_s=1500, cores=2)
    assert helper_ms == pytest.approx(0.2)
    assert bound == pytest.approx(2000 / 1.4 / 1500)


def test_without_messages_only_the_models_bound_it() -> None:
    run = shadow_run(0, 0, {"agent": 0.0})
    helper_ms, bound = ratio_bound(run, model_ms_per_pair=1.0, raw_pairs_per_s=1000, cores=2)
    assert helper_ms == 0.0
    assert bound == pytest.approx(2.0)


def test_a_rate_is_held_when_the_line_pace_is_kept_and_the_candidate_skips_nothing() -> None:
    assert keeps_up(shadow_run(300, 300, {}), 300)
    assert keeps_up(shadow_run(295, 293, {}), 300)  # pacer jitter, 2 skips in 295
    assert not keeps_up(shadow_run(280, 280, {}), 300)  # the agent fell behind the line
    assert not keeps_up(shadow_run(300, 290, {}), 300)  # 10 skips in 300


def test_the_search_finds_the_highest_rate_held() -> None:
    capacity = 410.0  # a simulated agent: pairs every part up to 410 parts/s

    def measure(rate: float) -> PipelineRun:
        # Beyond its capacity the candidate skips a tenth of the parts.
        return shadow_run(rate, rate if rate <= capacity else 0.9 * rate, {})

    rate, run, tried = sustained_rate(measure, low=0.0, high=1000.0, steps=8)
    assert capacity - 1000 / 2**8 <= rate <= capacity
    assert run is not None and run.pairs_per_s == rate
    assert [r for r, _ in tried][:2] == [500.0, 250.0]
    assert all(held == (r <= capacity) for r, held in tried)


def test_no_rate_held_gives_zero() -> None:
    rate, run, tried = sustained_rate(lambda r: shadow_run(r, 0, {}), low=0, high=100, steps=3)
    assert (rate, run) == (0.0, None)
    assert [held for _, held in tried] == [False, False, False]
