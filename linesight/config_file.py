"""Configuration files: YAML with flag overrides on top, validated by a pydantic model, every
problem reported with the key's path. The station, the controller and the plans read theirs
this way."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic_core import PydanticCustomError

M = TypeVar("M", bound=BaseModel)

MAX_CONFIG_BYTES = 1024 * 1024
"""A configuration file or plan is a few kilobytes: a larger file named by mistake (a log, a
recording) is refused before PyYAML spends seconds and memory on it."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key path and the reason."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the
    last: an `automation: full` further down silently won over the one just edited). Keys a
    merge (`<<: *defaults`) brings in may still be overridden by the mapping's own.

    Checked where PyYAML flattens a mapping's merges, before it rewrites the node in place (a
    mapping merged into another may be flattened before it is built itself), once per node."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[Any, yaml.Node] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.get(key)
                except TypeError:  # an unhashable key: PyYAML's own check names it
                    continue
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line "
                        f"{earlier.start_mark.line + 1})", key_node.start_mark)
                first[key] = key_node
        super().flatten_mapping(node)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, as `yaml.safe_load` reads it but for duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than 1 MiB: not a configuration file")
        loaded = load_yaml(data.decode("utf-8"))
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
    parts = ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
    if exc.context_mark is None:  # "while scanning ..." with no place of its own: after where
        parts = parts[::-1]
    for text, mark in parts:
        if text:
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            said.append(f"{where}{text}")
    return "; ".join(said) or "not valid YAML"


def _not_true_or_false(value: Any) -> Any:
    # YAML reads yes, on and true as true: where a number belongs it is a typo, not 1
    # (pydantic takes true for 1, so `audit_fraction: yes` audited every part).
    if isinstance(value, bool):
        raise PydanticCustomError(
            "number_type", "Input should be a number, not true or false (YAML reads yes, no, "
            "on and off as true or false)")
    return value


Count = Annotated[int, BeforeValidator(_not_true_or_false)]
"""An integer in a configuration or a plan: true or false is refused, not read as 1 or 0."""
Number = Annotated[float, BeforeValidator(_not_true_or_false)]
"""A number in a configuration or a plan: true or false is refused, not read as 1 or 0."""


def expand_home(path: str) -> str:
    """`path` with a leading ~ or ~user made the home folder, as a shell would: a YAML file or
    a --flag=~/x is not expanded by any shell, and a literal ~ folder would be made in the
    working folder instead. ValueError for a ~user no account has."""
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = path[1:].partition("/")[0]
        raise ValueError(f"{path}: no user {user!r} on this machine to take the home folder of")
    return expanded


def _config_path(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("an empty path (it would be the folder the command was started "
                             "from): name the file or folder")
        return expand_home(value)
    return value


ConfigPath = Annotated[Path, BeforeValidator(_config_path)]
"""A path in a configuration: an empty value is refused, not taken as the working folder, and
a leading ~ is the home folder."""


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


def make_data_dir(path: Path, key: str = "data_dir") -> None:
    """Create the folder `key` names if need be and check this process may write in it: at
    start-up, in words naming the key, not as a traceback from the first file opened in it."""
    make_folder(path, key)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: cannot write in it (uid {os.geteuid()} needs write "
                          "permission on the folder)")


def make_folder(path: Path, key: str) -> None:
    """Create the folder `key` names if it is missing (ConfigError naming the key if it is a
    file or cannot be created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot create it: {exc.strerror}") from exc


def path_flag(text: str) -> Path:
    """argparse type of a flag naming a file or folder: an empty one is refused (Path("") is
    the folder the command was started from), and a leading ~ is the home folder (a shell
    does not expand --flag=~/x)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name the file or folder")
    try:
        return Path(expand_home(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
