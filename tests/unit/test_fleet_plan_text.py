"""A plan whose text holds a string no JSON document can store (a lone surrogate, from a
`\\ud800` escape in a double-quoted YAML string) is refused when it is read, naming the key,
and never reaches the store, where saving the rollout would fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.plan import PlanError, load_plan, parse_plan

PLAN = """
name: text-test
{top}
stages:
  - name: shadow
    stations: {stations}
    mode: shadow
  - name: promote
    stations: all
    mode: promote
"""


def plan_text(top: str = "", stations: str = "[s1]") -> str:
    return PLAN.format(top=top, stations=stations)


@pytest.mark.parametrize(("top", "stations", "key"), [
    ('description: "\\ud800"', "[s1]", "description"),
    ("", '{labels: {line: "\\udc00"}}', "stages.0.stations.labels.line"),
    ("", '{labels: {"\\ud800": A}}', "stages.0.stations.labels"),
], ids=["description", "label-value", "label-key"])
def test_a_lone_surrogate_anywhere_in_a_plan_is_refused_naming_the_key(
    top: str, stations: str, key: str
) -> None:
    document: Any = yaml.safe_load(plan_text(top, stations))
    with pytest.raises(PlanError, match=f"{key}: not valid Unicode text"):
        parse_plan(document, "plan_yaml")


def test_a_plan_file_with_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text('description: "\\ud800"'))
    with pytest.raises(PlanError, match="description: not valid Unicode text"):
        load_plan(path)


def test_a_plan_of_valid_text_is_read_as_before() -> None:
    plan = parse_plan(yaml.safe_load(plan_text('description: "caf\\u00e9 \\U0001F600"')))
    assert plan.description == "café 😀"
    plan.model_dump_json()  # storable


# --- a boolean where a number belongs -----------------------------------------------------------

NUMBERS = """
name: numbers
{top}
stages:
  - name: canary
    stations: {{count: {count}}}
    mode: canary
    fraction: {fraction}
    exit: {{min_parts: {min_parts}, min_labelled_disagreements: 1, max_duration_s: {duration}}}
    gate: {{min_labels: {min_labels}, max_disagreement_rate: {ceiling}}}
  - name: promote
    stations: {{percent: {percent}}}
    mode: promote
"""
GOOD = {"top": "", "count": 1, "fraction": 0.1, "min_parts": 100, "duration": 600,
        "min_labels": 10, "ceiling": 0.3, "percent": 50}


@pytest.mark.parametrize(("setting", "value", "key"), [
    ("fraction", "yes", "stages.0.fraction"),
    ("ceiling", "on", "stages.0.gate.max_disagreement_rate"),
    ("min_labels", "true", "stages.0.gate.min_labels"),
    ("min_parts", "true", "stages.0.exit.min_parts"),
    ("duration", "true", "stages.0.exit.max_duration_s"),
    ("count", "yes", "stages.0.stations.count"),
    ("percent", "true", "stages.1.stations.percent"),
    ("top", "command_timeout_s: true", "command_timeout_s"),
], ids=lambda value: str(value).replace(" ", ""))
def test_a_boolean_where_a_number_belongs_is_refused(setting: str, value: str, key: str) -> None:
    """YAML reads yes, on and true as booleans; for a number they are a typo, not 1: a canary
    with `fraction: yes` would let the candidate decide every part."""
    document = yaml.safe_load(NUMBERS.format(**{**GOOD, setting: value}))
    with pytest.raises(PlanError, match=f"{key}: Input should be a number, not true or false"):
        parse_plan(document)


def test_numbers_and_booleans_where_they_belong_are_read_as_before() -> None:
    document = yaml.safe_load(NUMBERS.format(**GOOD))
    document["stages"][0]["approval"] = True
    plan = parse_plan(document)
    assert plan.stages[0].fraction == 0.1 and plan.stages[0].exit.max_duration_s == 600
    assert plan.stages[0].approval is True
