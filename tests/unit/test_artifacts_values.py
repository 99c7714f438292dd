"""Manifest numbers from outside: a preprocessing value or threshold that is not a finite
number is refused when the manifest is read, naming the field, before any part is judged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.preprocess import preprocess
from linesight import artifacts as a
from tests.support import V2


def manifest_text(**changes: object) -> str:
    document = json.loads((V2 / a.MANIFEST_FILE).read_text())
    document["input"].update(changes)
    return json.dumps(document)


def test_an_infinite_std_would_turn_every_frame_into_the_same_tensor() -> None:
    """Why it matters: with std = inf a scratched part and a clean one look alike to the model,
    which then passes (or rejects) every part with the same confidence."""
    spec = a.InputSpec(name="image", layout="NCHW", height=8, width=8, colour="rgb",
                       dtype="float32", std=(1.0,)).model_copy(update={"std": (float("inf"),)})
    dark = preprocess(np.zeros((8, 8, 3), np.uint8), spec)
    bright = preprocess(np.full((8, 8, 3), 255, np.uint8), spec)
    assert np.array_equal(dark, bright)


@pytest.mark.parametrize(("field", "raw"), [
    ("std", "[Infinity]"),
    ("std", "[1e999]"),
    ("mean", "[NaN]"),
    ("scale", "Infinity"),
])
def test_a_preprocessing_value_that_is_not_finite_is_refused(field: str, raw: str) -> None:
    text = manifest_text(**{field: "PLACEHOLDER"}).replace('"PLACEHOLDER"', raw)
    with pytest.raises(a.BundleError) as raised:
        a.parse_manifest(text.encode())
    assert raised.value.check == "manifest-schema"
    assert f"input.{field}" in raised.value.detail and "finite" in raised.value.detail


@pytest.mark.parametrize("raw", ["NaN", "Infinity"])
def test_a_metric_that_is_not_finite_is_refused(raw: str) -> None:
    document = json.loads((V2 / a.MANIFEST_FILE).read_text())
    document["metrics"]["per_class_recall"]["ok"] = "PLACEHOLDER"
    text = json.dumps(document).replace('"PLACEHOLDER"', raw)
    with pytest.raises(a.BundleError, match=r"metrics\.per_class_recall\.ok: .*finite"):
        a.parse_manifest(text.encode())


def test_the_shipped_manifest_still_parses() -> None:
    assert a.parse_manifest((V2 / a.MANIFEST_FILE).read_bytes()).name == "part-classifier"


@pytest.mark.parametrize("name", ["model\x00.onnx", "x" * 300, "", "con\nfig.json", ".", ".."])
def test_a_file_name_no_file_system_takes_is_refused_naming_it(name: str) -> None:
    """A signed manifest can still list a name the disk cannot hold: refused at the manifest
    with the name, before any download (not "embedded null byte" from the file system)."""
    document = json.loads((V2 / a.MANIFEST_FILE).read_text())
    document["files"][name] = next(iter(document["files"].values()))
    with pytest.raises(a.BundleError) as raised:
        a.parse_manifest(json.dumps(document).encode())
    assert raised.value.check == "manifest-schema"
    assert repr(name) in raised.value.detail, raised.value.detail
