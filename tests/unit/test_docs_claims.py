"""The documentation's checkable promises: links resolve, every flag it shows exists, its
configuration examples load, and its fault and metric tables match what the code raises."""

from __future__ import annotations

import argparse
import copy
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from deploy.config import ControllerConfig
from deploy.plan import GateSettings, load_plan
from edge_agent.config import AgentConfig
from edge_agent.metrics import AgentMetrics
from linesight.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _prose(page: Path) -> str:
    return FENCE.sub("", page.read_text())


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", _prose(page), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in headings}


def _section(page: str, heading: str) -> str:
    """The text under `## heading` up to the next heading of that level or above."""
    text = (REPO / page).read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"{page} has no section {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"[a-z]+:", link):
            continue  # http:, https:, mailto:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_lines(page: Path) -> list[str]:
    """`linesight ...` in inline code and in code blocks (continuation lines joined)."""
    text = page.read_text()
    lines = re.findall(r"`(?:\.venv/bin/)?(linesight [^`]+)`", FENCE.sub("", text))
    for _, block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(r"(?:^|[\s/])(linesight [a-z].*)", line)
            if found:
                lines.append(found.group(1))
    return lines


def test_every_flag_a_page_shows_with_a_command_exists() -> None:
    root = build_parser()
    unknown = []
    checked = 0
    for page in PAGES:
        for line in _command_lines(page):
            parser = root
            for word in line.split()[1:]:
                sub = _subcommands(parser)
                if word not in sub:
                    break
                parser = sub[word]
            if parser is root:
                continue  # `linesight --help`, or a user name in a shell line
            known = {option for action in parser._actions for option in action.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
                checked += 1
                if flag not in known:
                    unknown.append(f"{page.name}: {flag} in {line!r}")
    assert checked > 20
    assert not unknown, "\n".join(unknown)


def _own_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags that set one configuration key each."""
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--")} - {"--help", "--config", "--set"}


def test_the_pages_name_every_flag_of_the_agent_and_the_controller() -> None:
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"have their own flag \((.*?)`linesight agent --help`", readme, re.S)
    assert listed
    agent = _subcommands(build_parser())["agent"]
    assert set(re.findall(r"`(--[a-z-]+)`", listed.group(1))) == _own_flags(agent)
    page = (REPO / "docs" / "controller.md").read_text()
    listed = re.search(r"; flags (.*?) override them", page, re.S)
    assert listed
    serve = _subcommands(_subcommands(build_parser())["fleet"])["serve"]
    assert set(re.findall(r"`(--[a-z-]+)`", listed.group(1))) == _own_flags(serve)


def _yaml_blocks(page: str, first_line: str = "") -> list[Any]:
    return [yaml.safe_load(block) for kind, block in FENCE.findall((REPO / page).read_text())
            if kind == "yaml" and block.startswith(first_line)]


def test_the_readme_configuration_examples_load() -> None:
    (station,) = _yaml_blocks("README.md", "# station.yaml")
    (fleet,) = _yaml_blocks("README.md", "# fleet.yaml")
    station["broker"]["client_id"] = "linesight-agent-press-01"
    AgentConfig.model_validate(station)
    fleet["broker"]["client_id"] = "linesight-fleet-controller"
    fleet["api_token"] = "0123456789abcdef" * 2  # noqa: S105 - the page shows an elided one
    ControllerConfig.model_validate(fleet)


def test_the_readme_examples_show_the_defaults_where_they_tune() -> None:
    """The README's station.yaml and fleet.yaml give the default of every tuning key they show."""
    (station,) = _yaml_blocks("README.md", "# station.yaml")
    defaults = AgentConfig.model_fields
    for section in ("inference", "outbox", "review", "storage"):
        default = defaults[section].default_factory().model_dump()  # type: ignore[misc,call-arg]
        assert {key: default[key] for key in station[section]} == station[section], section
    assert station["audit_fraction"] == defaults["audit_fraction"].default
    (fleet,) = _yaml_blocks("README.md", "# fleet.yaml")
    for key in ("http_port", "retention_days", "min_free_mb", "command_ttl_s"):
        assert fleet[key] == ControllerConfig.model_fields[key].default, key


def test_the_deploy_guide_station_snippets_load() -> None:
    base: dict[str, Any] = {"station": "press-01", "source": "synthetic:", "active": "/opt/m",
            "data_dir": "/var/lib/linesight",
            "broker": {"url": "mqtt://line-server:1883", "client_id": "c"}}
    blocks = _yaml_blocks("docs/deploy.md")  # every one a piece of a station.yaml
    assert blocks
    for block in blocks:
        document = {**base, **block}
        document["broker"] = {**base["broker"], **block.get("broker", {})}
        AgentConfig.model_validate(document)


def test_the_shipped_plans_load() -> None:
    plans = sorted((REPO / "deploy" / "plans").glob("*.yaml"))
    assert plans
    for plan in plans:
        assert load_plan(plan).stages, plan.name


def _float_settings(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every float key of a configuration model, nested models included."""
    for name, field in model.model_fields.items():
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _float_settings(kind, f"{prefix}{name}.")
            elif kind is float:
                yield prefix + name


def _with(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(document)
    *parents, leaf = path.split(".")
    inner = document
    for parent in parents:
        inner = inner.setdefault(parent, {})
    if parents == ["reject_output"]:
        inner.update(type="webhook", url="http://plc-gateway/reject")
    inner[leaf] = value
    return document


_STATION = {"station": "press-01", "source": "synthetic:", "active": "/opt/m",
            "data_dir": "/var/lib/linesight",
            "broker": {"url": "mqtt://line-server:1883", "client_id": "c"}}
_CONTROLLER = {"data_dir": "/var/lib/c", "bundles": "/opt/b",
               "broker": {"url": "mqtt://line-server:1883", "client_id": "c"}}
_FLOAT_CASES = [
    pytest.param(config, document, path, id=f"{config.__name__}.{path}")
    for config, document in ((AgentConfig, _STATION), (ControllerConfig, _CONTROLLER))
    for path in _float_settings(config)
]


@pytest.mark.parametrize(("config", "document", "path"), _FLOAT_CASES)
def test_no_setting_takes_infinity_or_nan(
    config: type[BaseModel], document: dict[str, Any], path: str
) -> None:
    """docs/agent.md: `.inf` and `.nan` are refused with the key's path."""
    config.model_validate(document)
    for value in (math.inf, math.nan):
        with pytest.raises(ValidationError, match=re.escape(path.split(".")[-1])):
            config.model_validate(_with(document, path, value))


def test_the_broker_snippet_repeats_nothing_debians_mosquitto_conf_sets() -> None:
    """Debian's /etc/mosquitto/mosquitto.conf sets these, and mosquitto refuses a second one
    ("Duplicate persistence_location value in configuration")."""
    (snippet,) = [block for kind, block in FENCE.findall((REPO / "docs" / "deploy.md").read_text())
                  if kind == "conf" and block.startswith("# /etc/mosquitto/conf.d/")]
    options = {line.split()[0] for line in snippet.splitlines() if line and line[0] != "#"}
    assert options & {"persistence_location", "persistence_file", "pid_file"} == set()


def test_the_gate_settings_shown_are_the_defaults() -> None:
    (block,) = _yaml_blocks("docs/gates.md", "gate:")
    assert block["gate"] == GateSettings().model_dump()


def test_the_fault_table_lists_exactly_the_faults_the_agent_raises() -> None:
    source = (REPO / "edge_agent" / "agent.py").read_text()
    raised = set(re.findall(r'(?:_raise_fault|_fault_while)\(\s*"([a-z_]+)"', source))
    for suffix in re.findall(r'_raise_fault\(\s*f"\{\w+\}_([a-z_]+)"', source):
        raised |= {f"active_{suffix}", f"candidate_{suffix}"}
    table = _section("docs/agent.md", "Faults")
    documented = {code for row in re.findall(r"^\| (.*?) \|", table, re.M)
                  for code in re.findall(r"`([a-z_]+)`", row)}
    assert raised, "no fault found in edge_agent/agent.py"
    assert documented == raised


def test_the_station_metrics_listed_are_exactly_the_agents() -> None:
    names = set()
    for family in AgentMetrics("press-01").registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    listed = set(re.findall(r"`(linesight_[a-z_]+)", _section("docs/agent.md", "Monitoring")))
    assert listed == names


def test_the_controller_metrics_listed_exist() -> None:
    api = (REPO / "deploy" / "api.py").read_text()
    listed = set(re.findall(r"`(linesight_fleet_[a-z_]+)`", _section("docs/controller.md",
                                                                      "HTTP API")))
    assert listed
    assert {name for name in listed if f'"{name}"' not in api} == set()
