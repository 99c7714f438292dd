"""The model-cost benchmark's heavier models: the same answers as the shipped ones, more work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.model_cost import heavier_model
from tests.support import V2

pytestmark = pytest.mark.unit


def _answers(path: Path, tensor: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": tensor})[0])


def test_a_heavier_model_answers_as_the_original_with_more_convolutions(tmp_path: Path) -> None:
    original = V2 / "model.onnx"
    heavier = tmp_path / "heavier.onnx"
    heavier_model(original, heavier, layers=3)
    convs = [len([n for n in onnx.load(str(p)).graph.node if n.op_type == "Conv"])
             for p in (original, heavier)]
    assert convs[1] == convs[0] + 3
    tensor = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert np.allclose(_answers(original, tensor), _answers(heavier, tensor), atol=1e-6)


def test_no_extra_layers_is_the_same_graph(tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    heavier_model(V2 / "model.onnx", copy, layers=0)
    assert [n.op_type for n in onnx.load(str(copy)).graph.node] == [
        n.op_type for n in onnx.load(str(V2 / "model.onnx")).graph.node
    ]
