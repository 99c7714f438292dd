"""Configuration files: YAML with flag overrides on top, validated by a pydantic model, every
problem reported with the key's path. The station, the controller and the plans read theirs
this way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and the reason."""


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(exc)}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(loaded).__name__}")
    return loaded or {}


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is, without PyYAML's copy of the line: the line may hold
    a password, and the message goes to the journal."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    said = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            said.append(f"{where}{text}")
    return "; ".join(said) or "not valid YAML"


def describe(exc: ValidationError, what: str, source: str) -> str:
    lines = [f"invalid {what} ({source}):"]
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(root)"
        lines.append(f"  {path}: {error['msg']}")
    return "\n".join(lines)


def set_path(document: dict[str, Any], dotted: str, value: Any) -> None:
    node = document
    *parents, leaf = dotted.split(".")
    for parent in parents:
        child = node.get(parent)
        if child is None:  # absent, or a section whose keys are all commented out (null)
            child = node[parent] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {parent} is not a mapping in the configuration")
        node = child
    node[leaf] = value


def load_model(
    model: type[M],
    what: str,
    path: Path | None,
    overrides: Mapping[str, Any],
    defaults: Callable[[dict[str, Any]], None] = lambda _document: None,
) -> M:
    """The YAML file (optional) with overrides (dotted keys, e.g. 'broker.url') on top, then
    `defaults` filling what depends on other keys, then validation.

    Every override is applied as given: None sets the key to null (`--set candidate=null`),
    which the model accepts or refuses with the key's path. Callers leave out the flags the
    user did not give."""
    document = read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "flags"
    if path is not None and overrides:
        source = f"{path} and flags"
    for dotted, value in overrides.items():
        set_path(document, dotted, value)
    defaults(document)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(describe(exc, what, source)) from exc
