"""A rollout plan is data: ordered stages, each naming its stations, a mode, exit conditions, a
gate and an optional human approval. Loaded from YAML and validated with the key's path."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from linesight.config_file import Count, Number, load_yaml
from linesight.protocol import STATION_ID_PATTERN

# Upper bounds on a plan's durations, in seconds. Beyond them a value is a typo or a way of
# saying "never" that the rollout cannot honour (a deadline must be a date it can compute).
MAX_STAGE_DURATION_S = 30 * 24 * 3600  # 30 days; Resume gives a stage a fresh window
MAX_COMMAND_TIMEOUT_S = 24 * 3600
MAX_COMMAND_RETRY_S = 3600


class PlanError(ValueError):
    """A plan that cannot run; the message names the key and the reason."""


class Strict(BaseModel):
    # No inf or nan anywhere in a plan: every number in it is a count, a rate or a duration.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ByName(Strict):
    names: list[Annotated[str, Field(pattern=STATION_ID_PATTERN)]] = Field(min_length=1)


class ByLabel(Strict):
    labels: dict[str, str] = Field(min_length=1)


class ByCount(Strict):
    count: Count = Field(ge=1)


class ByPercent(Strict):
    percent: Number = Field(gt=0, le=100)


class AllStations(Strict):
    all: Literal[True] = True


_SELECTOR_KEYS = {"names": "ByName", "labels": "ByLabel", "count": "ByCount",
                  "percent": "ByPercent", "all": "AllStations"}


def _selector_kind(value: Any) -> str | None:
    """Which selector a `stations:` mapping is, by the one key that names it; None (one error
    saying what is expected, not one per kind) when it has none of them."""
    if isinstance(value, Mapping):
        for key, kind in _SELECTOR_KEYS.items():
            if key in value:
                return kind
        return None
    return type(value).__name__ if isinstance(value, Strict) else None


Selector = Annotated[
    Annotated[ByName, Tag("ByName")] | Annotated[ByLabel, Tag("ByLabel")]
    | Annotated[ByCount, Tag("ByCount")] | Annotated[ByPercent, Tag("ByPercent")]
    | Annotated[AllStations, Tag("AllStations")],
    Discriminator(
        _selector_kind, custom_error_type="station_selector",
        custom_error_message="give a list of station ids, all, or one of names:, labels:, "
        "count:, percent:",
    ),
]


class ExitConditions(Strict):
    min_parts: Count = Field(default=100, ge=0, description="parts both models judged")
    min_labelled_disagreements: Count = Field(default=10, ge=0)
    max_duration_s: Number = Field(default=3600, gt=0, le=MAX_STAGE_DURATION_S)


class GateSettings(Strict):
    """Passed to deploy.gates.GateConfig; see docs/gates.md for how to choose them."""

    delta: Number = Field(default=0.02, gt=0, lt=1)
    alpha: Number = Field(default=0.05, gt=0, lt=0.5)
    beta: Number = Field(default=0.2, gt=0, lt=0.5)
    min_labels: Count = Field(default=10, ge=1)
    escape_delta: Number = Field(
        default=0.01, gt=0, lt=1,
        description="tolerated increase in the share of parts that are defects the model passes",
    )
    max_disagreement_rate: Number | None = Field(default=0.3, gt=0, le=1)
    max_p95_latency_ms: Number | None = Field(default=None, gt=0)


class Stage(Strict):
    name: str = Field(min_length=1, max_length=80)
    stations: Selector
    mode: Literal["shadow", "canary", "blue_green", "promote"]
    fraction: Number | None = Field(default=None, gt=0, le=1, description="canary only")
    exit: ExitConditions = Field(default_factory=ExitConditions)
    gate: GateSettings = Field(default_factory=GateSettings)
    on_inconclusive: Literal["pause", "rollback"] = "pause"
    on_station_fault: Literal["rollback", "pause"] = "rollback"
    approval: bool = Field(default=False, description="wait for a human approval after passing")

    @field_validator("stations", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`stations: [a, b]` names stations; `stations: all` takes the whole fleet."""
        if isinstance(value, list):
            return {"names": value}
        if value == "all":
            return {"all": True}
        return value

    @model_validator(mode="after")
    def _fraction(self) -> Stage:
        if self.mode == "canary" and self.fraction is None:
            raise ValueError("a canary stage needs a fraction")
        if self.mode != "canary" and self.fraction is not None:
            raise ValueError("fraction belongs to canary stages only")
        return self


class RolloutPlan(Strict):
    name: str = Field(min_length=1, max_length=80)
    description: str = ""
    stages: list[Stage] = Field(min_length=1)
    command_timeout_s: Number = Field(default=60, gt=0, le=MAX_COMMAND_TIMEOUT_S)
    command_retry_s: Number = Field(default=5, gt=0, le=MAX_COMMAND_RETRY_S)
    promote_without_evidence: bool = Field(
        default=False, description="let the first stage be a promotion: the candidate then "
        "decides parts without any stage's gate; for a model judged elsewhere")

    @model_validator(mode="after")
    def _ends_in_promotion(self) -> RolloutPlan:
        if self.stages[-1].mode != "promote":
            raise ValueError("the last stage must be a promote stage")
        return self


def _not_text(document: Any) -> str | None:
    """The key path of the first string (key or value) in `document` that is not valid Unicode
    text, such as a lone surrogate from a `\\ud800` escape, which the stored rollout cannot hold;
    else None."""
    def bad(text: str) -> bool:
        try:
            text.encode()
        except UnicodeEncodeError:
            return True
        return False

    stack: list[tuple[str, Any]] = [("", document)]
    seen: set[int] = set()  # YAML aliases share (or nest) a node: each is looked at once
    while stack:  # no recursion: a document PyYAML could build may already be deep
        path, value = stack.pop()
        if isinstance(value, str):
            if bad(value):
                return path or "(root)"
            continue
        if not isinstance(value, Mapping | list) or id(value) in seen:
            continue
        seen.add(id(value))
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and bad(key):
                return path or "(root)"
            stack.append((f"{path}.{key}" if path else str(key), item))
    return None


def parse_plan(document: Any, source: str = "plan") -> RolloutPlan:
    if not isinstance(document, Mapping):
        raise PlanError(f"{source}: a plan is a mapping with 'name' and 'stages'")
    bad_text = _not_text(document)
    if bad_text is not None:
        raise PlanError(f"invalid rollout plan ({source}):\n  {bad_text}: not valid Unicode "
                        "text (a lone surrogate such as \\ud800)")
    try:
        plan = RolloutPlan.model_validate(document)
    except ValidationError as exc:
        problems = [
            f"  {_key_path(error['loc'])}: {error['msg']}"
            for error in exc.errors()
        ]
        raise PlanError(f"invalid rollout plan ({source}):\n" + "\n".join(problems)) from exc
    problems = [f"  {problem}" for problem in
                [*_ungated_promotion(plan), *_duplicate_stage_names(plan)]]
    if problems:
        raise PlanError(f"invalid rollout plan ({source}):\n" + "\n".join(problems))
    return plan


def _key_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the plan's keys (stages.0.stations.names), without the
    selector kinds pydantic puts in between."""
    keys = [str(part) for part in loc if part not in _SELECTOR_KEYS.values()]
    return ".".join(keys) or "(root)"


def _ungated_promotion(plan: RolloutPlan) -> list[str]:
    """A promotion with no stage before it lets a model decide parts on no evidence at all:
    only when the plan says so in as many words. Checked on a plan a person wrote, so a
    rollout stored before the key existed still loads."""
    if plan.stages[0].mode == "promote" and not plan.promote_without_evidence:
        return ["stages.0.mode: the first stage promotes, so the candidate would decide parts "
                "without any gate's evidence; put a shadow, canary or blue_green stage before "
                "it, or, for a model judged elsewhere, say promote_without_evidence: true"]
    return []


def _duplicate_stage_names(plan: RolloutPlan) -> list[str]:
    """The history and every rollback reason name a stage by its name, so each must be unique.
    Checked on a plan a person wrote, not in the model: a stored rollout still loads."""
    first: dict[str, int] = {}
    problems: list[str] = []
    for index, stage in enumerate(plan.stages):
        if stage.name in first:
            problems.append(f"stages.{index}.name: duplicate stage name {stage.name!r} "
                            f"(stages.{first[stage.name]} has it too)")
        else:
            first[stage.name] = index
    return problems


def load_plan(path: Path) -> RolloutPlan:
    try:
        document = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PlanError(f"{path} is not valid YAML: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        # Not UTF-8, an integer of more than 4,300 digits, an impossible date, deep nesting.
        raise PlanError(f"{path} cannot be read as a plan: {str(exc)[:300]}") from exc
    return parse_plan(document, str(path))


def select_stations(
    selector: Selector, fleet: Mapping[str, Mapping[str, str]], already: Sequence[str]
) -> list[str]:
    """Resolve a stage's selector against the fleet (station -> labels), in name order.

    Count and percentage prefer stations already in the rollout, then the rest by name, so a
    later wave grows the set instead of jumping to other stations.
    """
    names = sorted(fleet)
    if isinstance(selector, ByName):
        unknown = [name for name in selector.names if name not in fleet]
        if unknown:
            raise PlanError(f"stations not in the fleet: {', '.join(unknown)}")
        return sorted(set(selector.names))  # a station named twice is commanded once
    if isinstance(selector, ByLabel):
        chosen = [
            name for name in names
            if all(fleet[name].get(k) == v for k, v in selector.labels.items())
        ]
    elif isinstance(selector, AllStations):
        chosen = names
    else:
        wanted = (
            selector.count if isinstance(selector, ByCount)
            else math.ceil(len(names) * selector.percent / 100)
        )
        ordered = [n for n in names if n in already] + [n for n in names if n not in already]
        chosen = sorted(ordered[:wanted])
        if len(chosen) < wanted:
            raise PlanError(f"the stage wants {wanted} stations, the fleet has {len(names)}")
    if not chosen:
        raise PlanError("the stage's selector matches no station")
    return chosen
