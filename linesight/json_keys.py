"""JSON documents read with every key once: Python's json module (and pydantic) keep the last
of two equal keys where other readers keep the first, so a document with both could mean one
thing to this appliance and another to a tool that reads the same bytes (a signed manifest,
a request a proxy logged)."""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKeyError(f"the key {key[:64]!r} appears twice in one object")
        document[key] = value
    return document


def loads(data: str | bytes) -> Any:
    """`json.loads`, refusing an object that names a key twice (DuplicateKeyError, a
    ValueError); every other error is json's own."""
    return json.loads(data, object_pairs_hook=_unique)
