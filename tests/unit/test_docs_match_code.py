"""What a factory integrator copies from the pages matches the code: every station and controller
key and its default, the station screen's options, every subcommand and metric named, and
`linesight sim`'s exit statuses (tests/unit/test_docs_claims.py checks the flags, links and
examples)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from deploy.config import ControllerConfig
from edge_agent.config import AgentConfig
from edge_agent.metrics import AgentMetrics
from edge_agent.sources import SourceOptions
from linesight.cli import build_parser
from linesight.sim import EXIT_STATUS, EXIT_TIMED_OUT

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
# The pages a new user follows (docs/controller.md, sources.md, benchmarks.md have their own).
PAGES = [REPO / "README.md", *(REPO / "docs" / name for name in (
    "agent.md", "station-ui.md", "deploy.md", "protocol.md", "models.md", "gates.md",
    "dashboard.md"))]
# Where a default is not a constant: the station's client id is made from its name.
COMPUTED_DEFAULTS = {"broker.client_id": "linesight-agent-<station>"}
# The controller's is filled in when its file is read (deploy.config._client_id).
CONTROLLER_COMPUTED_DEFAULTS = {"broker.client_id": "linesight-fleet-controller"}


def _section(page: str, heading: str) -> str:
    text = (REPO / page).read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"{page} has no section {heading!r}"
    return match.group(1)


def _table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text`, cells stripped."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _plain(value: Any) -> Any:
    """A default as YAML would write it: enums by value, paths and models as plain data."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    return value


def _station_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, default or PydanticUndefined) of every station setting; source_options
    counts as one key (docs/sources.md lists its options)."""
    for name, field in model.model_fields.items():
        nested = [kind for kind in (field.annotation, *get_args(field.annotation))
                  if isinstance(kind, type) and issubclass(kind, BaseModel)]
        if nested and name != "source_options":
            seen: set[str] = set()
            for kind in nested:  # a union (reject_output) contributes each member's keys once
                for key, default in _station_keys(kind, f"{prefix}{name}."):
                    if key not in seen:
                        seen.add(key)
                        yield key, default
            continue
        factory = field.default_factory
        yield prefix + name, factory() if factory else field.default  # type: ignore[call-arg]


def test_the_configuration_reference_lists_every_station_key_with_its_default() -> None:
    _check_reference("docs/agent.md", AgentConfig, COMPUTED_DEFAULTS)


def test_the_configuration_reference_lists_every_controller_key_with_its_default() -> None:
    _check_reference("docs/controller.md", ControllerConfig, CONTROLLER_COMPUTED_DEFAULTS)


def _check_reference(page: str, model: type[BaseModel], computed: dict[str, str]) -> None:
    rows = _table(_section(page, "Configuration reference"))
    documented: dict[str, str] = {}
    for key_cell, default_cell, _ in rows:
        (key,) = re.findall(r"`([a-z_.]+)`", key_cell)
        assert key not in documented, f"{key} is listed twice"
        documented[key] = default_cell
    keys = dict(_station_keys(model))
    assert set(documented) == set(keys), (
        f"missing from the page: {sorted(set(keys) - set(documented))}; "
        f"not a key: {sorted(set(documented) - set(keys))}")
    wrong = []
    shown: Any
    expected: Any
    for key, cell in documented.items():
        default = keys[key]
        if key in computed:
            shown, expected = cell, f"`{computed[key]}`"
        elif default is PydanticUndefined:
            shown, expected = cell.startswith("(required"), True
        else:
            literal = re.fullmatch(r"`([^`]*)`", cell)
            shown = yaml.safe_load(literal.group(1)) if literal else cell
            expected = _plain(default)
            if key == "source_options":  # the page shows `{}`: every option at its default
                shown = SourceOptions.model_validate(shown).model_dump(mode="json")
        if shown != expected:
            wrong.append(f"{key}: the page says {cell}, the code {expected!r}")
    assert not wrong, "\n".join(wrong)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parser(*words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        parser = _subcommands(parser)[word]
    return parser


def test_the_station_screen_options_table_is_linesight_ui() -> None:
    rows = _table(_section("docs/station-ui.md", "Starting the screen"))
    documented = {re.match(r"`(--[a-z-]+)", flag).group(1): default  # type: ignore[union-attr]
                  for flag, default, _ in rows}
    actions = {action.option_strings[0]: action for action in _parser("ui")._actions
               if action.option_strings and action.option_strings[0] != "-h"}
    assert set(documented) == set(actions)
    wrong = []
    for flag, cell in documented.items():
        action = actions[flag]
        if action.required:
            ok = cell == "(required)"
        elif isinstance(action, argparse._StoreTrueAction):
            ok = cell == "off"
        elif action.default is None:
            ok = cell.startswith("`<data-dir>/")  # a file in the data dir, named by the help
        else:
            ok = cell == f"`{action.default:g}`" if isinstance(action.default, float) \
                else cell == f"`{action.default}`"
        if not ok:
            wrong.append(f"{flag}: the page says {cell}, the code {action.default!r}")
    assert not wrong, "\n".join(wrong)


def _command_lines(page: Path) -> Iterator[str]:
    text = page.read_text()
    yield from re.findall(r"`(?:\.venv/bin/)?(linesight [^`]+)`", FENCE.sub("", text))
    for _, block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:^|[\s/])(linesight [a-z].*)", line)
            if found:
                yield found.group(1)


def test_every_subcommand_a_page_names_exists() -> None:
    root = build_parser()
    unknown, checked = [], 0
    for page in PAGES:
        for line in _command_lines(page):
            parser, words = root, line.split()[1:]
            for word in words:
                choices = _subcommands(parser)
                if not choices or not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                if word not in choices:
                    unknown.append(f"{page.name}: {word!r} in {line!r}")
                    break
                checked += 1
                parser = choices[word]
    assert checked > 30
    assert not unknown, "\n".join(unknown)


def _metric_names() -> set[str]:
    names = set()
    for family in AgentMetrics("press-01").registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    api = (REPO / "deploy" / "api.py").read_text()
    names |= set(re.findall(r'Gauge\(\s*"(linesight_fleet_[a-z_]+)"', api))
    return names


# `linesight_station`: the station screen's former cookie name (docs/station-ui.md).
NOT_METRICS = {"linesight_station"}


def test_every_metric_a_page_names_exists() -> None:
    known = _metric_names()
    assert {"linesight_parts_total", "linesight_fleet_disk_low"} <= known
    unknown = []
    for page in PAGES:
        text = page.read_text()
        for name in re.findall(r"`(linesight_[a-z_]+)(?:\{[^`]*\})?`", text):
            if name not in known | NOT_METRICS:
                unknown.append(f"{page.name}: {name}")
    assert not unknown, "\n".join(unknown)


def test_the_readme_sim_exit_statuses_are_the_code() -> None:
    table = re.search(r"^\| `outcome` \|.*?\n\n", (REPO / "README.md").read_text(), re.M | re.S)
    assert table
    documented = {}
    for outcomes, _, status in _table(table.group(0)):
        for outcome in re.findall(r"`([a-z_]+)`", outcomes):
            documented[outcome] = int(status)
    assert documented == {**EXIT_STATUS, "timed_out": EXIT_TIMED_OUT}


REPO_PATH = re.compile(
    r"(?<![\w./-])((?:bench|deploy|docs|edge_agent|linesight|models|scripts|station_ui|tests)"
    r"/[\w./-]*)")


def test_every_repository_file_a_page_names_exists() -> None:
    """`deploy/plans/demo.yaml`, `scripts/arm64-smoke`, `tests/...`: in code spans and blocks."""
    missing, checked = [], 0
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
        spans += [block for _, block in FENCE.findall(text)]
        for span in spans:
            for path in REPO_PATH.findall(span):
                path = path.rstrip(".")
                if path.startswith("linesight/v1"):
                    continue  # an MQTT topic
                checked += 1
                if not (REPO / path).exists():
                    missing.append(f"{page.name}: {path}")
    assert checked > 20
    assert not missing, "\n".join(sorted(set(missing)))
