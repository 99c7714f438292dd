"""The agent benchmark's bound on pairs / raw for an agent that cost nothing."""

from __future__ import annotations

import pytest

from bench.agent_throughput import PipelineRun, ratio_bound

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
