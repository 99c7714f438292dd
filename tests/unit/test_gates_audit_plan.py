"""Plan validation, audited: a plan a person wrote is refused at load time, naming the key, when
it asks for something the rollout cannot do sensibly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy.plan import PlanError, load_plan, parse_plan

pytestmark = pytest.mark.unit

PROMOTE = {"name": "promote everywhere", "stations": "all", "mode": "promote"}


def shadow(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "stations": ["press-01"], "mode": "shadow", **settings}


def refusal(document: dict[str, Any]) -> str:
    with pytest.raises(PlanError) as caught:
        parse_plan(document, "plan.yaml")
    return str(caught.value)


def test_two_stages_with_one_name_are_refused_naming_the_second() -> None:
    # The history and every rollback reason name a stage by its name ("gate failed in
    # 'shadow'"): two stages of one name make that record ambiguous.
    message = refusal({"name": "x", "stages": [
        shadow("shadow"), shadow("canary", mode="canary", fraction=0.1), shadow("shadow"), PROMOTE,
    ]})
    assert "stages.2.name: duplicate stage name 'shadow' (stages.0 has it too)" in message
    assert message.startswith("invalid rollout plan (plan.yaml):")


def test_a_duplicate_name_in_a_plan_file_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "name: x\nstages:\n"
        "  - {name: trial, stations: [press-01], mode: shadow}\n"
        "  - {name: trial, stations: all, mode: promote}\n"
    )
    with pytest.raises(PlanError, match=r"stages\.1\.name: duplicate stage name 'trial'"):
        load_plan(path)


def test_distinct_names_still_load() -> None:
    plan = parse_plan({"name": "x", "stages": [shadow("shadow"), shadow("Shadow"), PROMOTE]})
    assert [stage.name for stage in plan.stages] == ["shadow", "Shadow", "promote everywhere"]


@pytest.mark.parametrize(
    ("stage", "path", "words"),
    [
        (shadow("a", exit={"max_duration_s": 0}), "stages.0.exit.max_duration_s", "greater than 0"),
        (shadow("a", exit={"max_duration_s": -60}), "stages.0.exit.max_duration_s",
         "greater than 0"),
        (shadow("a", exit={"min_parts": -1}), "stages.0.exit.min_parts", "greater than or equal"),
        (shadow("a", mode="canary", fraction=0), "stages.0.fraction", "greater than 0"),
        (shadow("a", mode="canary", fraction=1.5), "stages.0.fraction", "less than or equal to 1"),
        (shadow("a", mode="canary"), "stages.0", "needs a fraction"),
        (shadow("a", fraction=0.5), "stages.0", "canary stages only"),
        (shadow("a", stations=[]), "stages.0.stations.names", "at least 1 item"),
        (shadow("a", stations={"labels": {}}), "stages.0.stations.labels",
         "at least 1 item"),
        (shadow("a", stations={"count": 0}), "stages.0.stations.count",
         "greater than or equal to 1"),
        (shadow("a", stations={"percent": 0}), "stages.0.stations.percent",
         "greater than 0"),
        (shadow("a", stations={"percent": 101}), "stages.0.stations.percent",
         "less than or equal to 100"),
        (shadow("a", gate={"delta": 0}), "stages.0.gate.delta", "greater than 0"),
        (shadow("a", gate={"delta": 1}), "stages.0.gate.delta", "less than 1"),
        (shadow("a", gate={"escape_delta": 0}), "stages.0.gate.escape_delta", "greater than 0"),
        (shadow("a", gate={"alpha": 0.5}), "stages.0.gate.alpha", "less than 0.5"),
        (shadow("a", gate={"beta": 0}), "stages.0.gate.beta", "greater than 0"),
        (shadow("a", gate={"min_labels": 0}), "stages.0.gate.min_labels",
         "greater than or equal to 1"),
        (shadow("a", gate={"max_disagreement_rate": 0}), "stages.0.gate.max_disagreement_rate",
         "greater than 0"),
        (shadow("a", gate={"max_p95_latency_ms": 0}), "stages.0.gate.max_p95_latency_ms",
         "greater than 0"),
        (shadow("a", gate={"alpha": float("nan")}), "stages.0.gate.alpha", "finite"),
        (shadow("a", gate={"delta": True}), "stages.0.gate.delta", "not true or false"),
        ({**shadow("a"), "name": ""}, "stages.0.name", "at least 1 character"),
    ],
)
def test_nonsensical_values_are_refused_naming_the_key(
    stage: dict[str, Any], path: str, words: str
) -> None:
    message = refusal({"name": "x", "stages": [stage, PROMOTE]})
    assert any(
        line.strip().startswith(f"{path}:") and words in line for line in message.splitlines()
    ), message


@pytest.mark.parametrize(
    ("top", "path"),
    [({"command_timeout_s": 0}, "command_timeout_s"), ({"command_retry_s": -1}, "command_retry_s")],
)
def test_nonsensical_command_timings_are_refused(top: dict[str, Any], path: str) -> None:
    message = refusal({"name": "x", "stages": [shadow("a"), PROMOTE], **top})
    assert f"  {path}: Input should be greater than 0" in message


def test_a_plan_without_stages_or_without_a_final_promotion_is_refused() -> None:
    assert "stages: List should have at least 1 item" in refusal({"name": "x", "stages": []})
    assert "the last stage must be a promote stage" in refusal(
        {"name": "x", "stages": [shadow("a")]}
    )


PROMOTE_ONLY = {"name": "straight to promotion",
                "stages": [{"name": "everywhere", "stations": "all", "mode": "promote"}]}


def test_a_plan_that_promotes_before_any_gate_is_refused() -> None:
    """A first stage that promotes lets the candidate decide parts with no evidence at all:
    a plan copied down to its last stage by mistake must not do that."""
    with pytest.raises(PlanError, match=r"stages\.0\.mode: the first stage promotes") as refused:
        parse_plan(PROMOTE_ONLY)
    assert "promote_without_evidence: true" in str(refused.value)


def test_a_plan_may_promote_without_evidence_when_it_says_so() -> None:
    plan = parse_plan({**PROMOTE_ONLY, "promote_without_evidence": True})
    assert [stage.mode for stage in plan.stages] == ["promote"]
    assert plan.promote_without_evidence


def test_a_gated_stage_before_the_promotion_needs_no_such_word() -> None:
    plan = parse_plan({"name": "shadow first", "stages": [
        {"name": "shadow", "stations": ["s1"], "mode": "shadow"},
        {"name": "everywhere", "stations": "all", "mode": "promote"}]})
    assert not plan.promote_without_evidence


def test_a_realignment_promotes_alone_and_says_why() -> None:
    from deploy.alignment import realign_plan
    from linesight.protocol import ModelRef

    model = ModelRef(name="part-classifier", version="2.0.0", sha256="a" * 64)
    plan = realign_plan(["s1"], model, 30)
    assert plan.promote_without_evidence
    # and it would load as a plan a person wrote
    assert parse_plan(plan.model_dump(mode="json")) == plan


@pytest.mark.parametrize("stations", [{"nmaes": ["s1"]}, "some", 5, {}])
def test_a_stations_value_of_no_known_kind_is_one_line_saying_what_is_expected(
    stations: object,
) -> None:
    """Not one line for each kind of selector it is not (there were five to ten)."""
    with pytest.raises(PlanError) as refused:
        parse_plan({"name": "x", "stages": [
            {"name": "s", "stations": stations, "mode": "shadow"},
            {"name": "p", "stations": "all", "mode": "promote"}]})
    lines = str(refused.value).splitlines()[1:]
    assert lines == ["  stages.0.stations: give a list of station ids, all, or one of names:, "
                     "labels:, count:, percent:"], lines


def test_a_selector_s_own_mistake_is_named_by_the_plan_s_keys() -> None:
    with pytest.raises(PlanError) as refused:
        parse_plan({"name": "x", "stages": [
            {"name": "s", "stations": {"names": ["s1"], "count": 2}, "mode": "shadow"},
            {"name": "p", "stations": "all", "mode": "promote"}]})
    lines = str(refused.value).splitlines()[1:]
    assert lines == ["  stages.0.stations.count: Extra inputs are not permitted"], lines
