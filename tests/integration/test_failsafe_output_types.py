"""A model whose output is not a floating-point probability row never decides a part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.agent import run_model
from edge_agent.inference import InferenceError, ModelSession
from edge_agent.policy import decide
from edge_agent.slots import UNLOADED_REF, LoadedModel
from linesight.artifacts import Manifest
from linesight.protocol import Action, AutomationLevel, DecidedBy
from tests.integration.test_inference import write_bundle

pytestmark = pytest.mark.integration


def constant_bundle(folder: Path, values: np.ndarray, elem_type: int) -> tuple[Path, Manifest]:
    """A signed bundle whose model answers `values` ([1, 2]) whatever the image."""
    constant = (
        helper.make_tensor("c", elem_type, list(values.shape), values.reshape(-1).tolist())
        if elem_type == TensorProto.STRING
        else numpy_helper.from_array(values)
    )
    node = helper.make_node("Constant", [], ["probabilities"], value=constant)
    return write_bundle(folder, [node], [], [1, 2], output_type=elem_type)


@pytest.mark.parametrize(
    ("values", "elem_type"),
    [
        (np.array([[1, 0]], np.int64), TensorProto.INT64),
        (np.array([[1, 0]], np.uint8), TensorProto.UINT8),
        (np.array([[True, False]]), TensorProto.BOOL),
        (np.array([[b"1", b"0"]], object), TensorProto.STRING),
    ],
    ids=["int64", "uint8", "bool", "string"],
)
def test_a_non_float_output_refuses_to_load(
    tmp_path: Path, values: np.ndarray, elem_type: int
) -> None:
    # A one-hot integer row (an argmax, not probabilities) would otherwise pass every part at
    # confidence 1, and a string row crashed the warm-up with a TypeError no caller expects.
    with pytest.raises(InferenceError, match="not floating-point probabilities"):
        ModelSession(*constant_bundle(tmp_path / "m", values, elem_type))


@pytest.mark.parametrize(
    ("dtype", "elem_type"),
    [(np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)],
    ids=["float16", "float64"],
)
def test_float16_and_float64_probabilities_are_judged(
    tmp_path: Path, dtype: type[np.floating], elem_type: int
) -> None:
    session = ModelSession(
        *constant_bundle(tmp_path / "m", np.array([[0.25, 0.75]], dtype), elem_type)
    )
    prediction = session.predict(np.zeros((8, 8, 3), np.uint8))
    assert (prediction.label, prediction.probabilities) == ("defect", (0.25, 0.75))
    assert type(prediction.confidence) is float


def test_a_tie_names_no_label_and_never_passes_the_part(tmp_path: Path) -> None:
    # [0.5, 0.5]: no label wins. Taking the first listed label would pass the part ("ok" comes
    # first) in full automation. A tie on the black warm-up frame does not refuse the model.
    session = ModelSession(
        *constant_bundle(tmp_path / "m", np.array([[0.5, 0.5]], np.float32), TensorProto.FLOAT)
    )
    with pytest.raises(InferenceError, match="no label wins"):
        session.predict(np.zeros((8, 8, 3), np.uint8))


def test_a_tie_in_full_automation_is_held_by_the_failsafe(tmp_path: Path) -> None:
    folder, manifest = constant_bundle(
        tmp_path / "m", np.array([[0.5, 0.5]], np.float32), TensorProto.FLOAT
    )
    model = LoadedModel(folder, manifest, UNLOADED_REF, ModelSession(folder, manifest))
    output = run_model(model, np.zeros((8, 8, 3), np.uint8), timeout_ms=10_000)
    part = decide("p-1", AutomationLevel.FULL, "active", output, {}, "defect", 0.0)
    assert (part.action, part.decided_by) == (Action.REVIEW, DecidedBy.FAILSAFE)
