"""ModelSession against real onnxruntime: the shipped bundles and deliberately broken graphs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edge_agent.inference import InferenceError, ModelSession, Prediction
from edge_agent.preprocess import preprocess
from edge_agent.synthetic import PartGenerator
from linesight.artifacts import (
    MODEL_FILE,
    InputSpec,
    Manifest,
    OutputSpec,
    build_bundle,
    load_public_key,
    verify_bundle,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ACTIVE = REPO / "models" / "part-classifier" / "1.0.0"
GRAY = REPO / "models" / "part-classifier-gray" / "1.0.0"
PUBLIC_KEY = REPO / "models" / "keys" / "demo.pub"
SIDE = 8
PIXELS = 3 * SIDE * SIDE
SPEC = InputSpec(
    name="image", layout="NCHW", height=SIDE, width=SIDE, colour="rgb", dtype="float32"
)


def shipped(bundle_dir: Path) -> tuple[Path, Manifest]:
    return bundle_dir, verify_bundle(bundle_dir, load_public_key(PUBLIC_KEY))


def flat_mean(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    """Append nodes computing the mean pixel of each image, shape [N, 1]; return its name."""
    inits.append(numpy_helper.from_array(np.full((PIXELS, 1), 1 / PIXELS, np.float32), "w_mean"))
    nodes.append(helper.make_node("Flatten", ["image"], ["flat"]))
    nodes.append(helper.make_node("MatMul", ["flat", "w_mean"], ["mean"]))
    return "mean"


def write_bundle(
    folder: Path,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    output_dims: list[int | str],
    output_name: str = "probabilities",
    output_type: int = TensorProto.FLOAT,
) -> tuple[Path, Manifest]:
    """A signed bundle around a hand-built graph taking `image` [N, 3, 8, 8]."""
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info(output_name, output_type, output_dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / MODEL_FILE))
    manifest = build_bundle(
        folder,
        name="broken",
        version="0.0.1",
        description="test graph",
        input=SPEC,
        output=OutputSpec(name="probabilities", kind="probabilities"),
        labels=("ok", "defect"),
        defect_label="defect",
        thresholds={"ok": 0.8, "defect": 0.6},
        metrics=None,
        private_key=Ed25519PrivateKey.generate(),
    )
    return folder, manifest


def half_and_half(tmp_path: Path) -> tuple[Path, Manifest]:
    """A valid model that answers [0.25, 0.75] for every image."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    mean = flat_mean(nodes, inits)
    inits.append(numpy_helper.from_array(np.zeros((1, 2), np.float32), "zeros"))
    inits.append(numpy_helper.from_array(np.array([[0.0, np.log(3.0)]], np.float32), "odds"))
    nodes.append(helper.make_node("Mul", [mean, "zeros"], ["nothing"]))
    nodes.append(helper.make_node("Add", ["nothing", "odds"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    return write_bundle(tmp_path / "half", nodes, inits, ["N", 2])


@pytest.mark.parametrize("bundle", [ACTIVE, GRAY], ids=["rgb-nchw-float", "gray-nhwc-uint8"])
def test_shipped_bundle_judges_synthetic_parts(bundle: Path) -> None:
    session = ModelSession(*shipped(bundle))
    parts = [PartGenerator(seed=77, defect_rate=0.5).part(i) for i in range(40)]
    predictions = [session.predict(part.image) for part in parts]
    for prediction in predictions:
        assert prediction.label in session.manifest.labels
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert prediction.confidence == max(prediction.probabilities)
        assert prediction.latency_ms > 0
    correct = sum(
        (p.label == "defect") == part.is_defective
        for p, part in zip(predictions, parts, strict=True)
    )
    assert correct >= 30


def test_predict_tensor_matches_predict() -> None:
    session = ModelSession(*shipped(ACTIVE))
    frame = PartGenerator(seed=3).part(0).image
    from_frame = session.predict(frame)
    from_tensor = session.predict_tensor(preprocess(frame, session.manifest.input))
    assert from_tensor.label == from_frame.label
    assert from_tensor.probabilities == pytest.approx(from_frame.probabilities, abs=1e-6)


def test_unavailable_provider_falls_back_to_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.inference"):
        session = ModelSession(*half_and_half(tmp_path), providers=("NoSuchExecutionProvider",))
    assert session.providers == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text
    prediction = session.predict(np.zeros((16, 16, 3), np.uint8))
    assert prediction == Prediction(
        label="defect", confidence=pytest.approx(0.75), probabilities=pytest.approx((0.25, 0.75)),
        latency_ms=prediction.latency_ms,
    )


def test_nan_output_raises(tmp_path: Path) -> None:
    # p = sqrt(0.0625 - mean pixel), answer [p, 1 - p]: [0.25, 0.75] on black (the warm-up
    # passes), NaN on a bright frame.
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    mean = flat_mean(nodes, inits)
    inits.append(numpy_helper.from_array(np.array([[0.0625]], np.float32), "sixteenth"))
    inits.append(numpy_helper.from_array(np.array([[1.0]], np.float32), "one"))
    nodes.append(helper.make_node("Sub", ["sixteenth", mean], ["room"]))
    nodes.append(helper.make_node("Sqrt", ["room"], ["low"]))
    nodes.append(helper.make_node("Sub", ["one", "low"], ["high"]))
    nodes.append(helper.make_node("Concat", ["low", "high"], ["probabilities"], axis=1))
    session = ModelSession(*write_bundle(tmp_path / "nan", nodes, inits, ["N", 2]))
    assert session.predict(np.zeros((8, 8, 3), np.uint8)).probabilities == (0.25, 0.75)
    with pytest.raises(InferenceError, match="nan"):
        session.predict(np.full((8, 8, 3), 255, np.uint8))


def test_nan_at_warm_up_refuses_to_load(tmp_path: Path) -> None:
    # 0 / 0 on the black warm-up frame.
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    mean = flat_mean(nodes, inits)
    nodes.append(helper.make_node("Div", [mean, mean], ["ratio"]))
    nodes.append(helper.make_node("Concat", ["ratio", "ratio"], ["probabilities"], axis=1))
    with pytest.raises(InferenceError, match="nan"):
        ModelSession(*write_bundle(tmp_path / "div", nodes, inits, ["N", 2]))


def test_wrong_output_width_declared_in_graph_refuses_to_load(tmp_path: Path) -> None:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    mean = flat_mean(nodes, inits)
    inits.append(numpy_helper.from_array(np.zeros((1, 3), np.float32), "zeros3"))
    nodes.append(helper.make_node("Mul", [mean, "zeros3"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    with pytest.raises(InferenceError, match="3 columns"):
        ModelSession(*write_bundle(tmp_path / "wide", nodes, inits, ["N", 3]))


def test_wrong_output_shape_at_run_time_raises(tmp_path: Path) -> None:
    # Declared [N, 2] but always answers two rows: only the answer itself shows the mistake.
    inits = [
        numpy_helper.from_array(np.zeros((2, 2), np.float32), "zeros"),
        numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "halves"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["image"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zeros"], ["nothing"]),
        helper.make_node("Add", ["nothing", "halves"], ["probabilities"]),
    ]
    with pytest.raises(InferenceError, match=r"output shape \(2, 2\)"):
        ModelSession(*write_bundle(tmp_path / "rows", nodes, inits, ["N", 2]))


def test_out_of_range_probabilities_raise(tmp_path: Path) -> None:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    mean = flat_mean(nodes, inits)
    inits.append(numpy_helper.from_array(np.array([[2.0, -1.0]], np.float32), "bad"))
    nodes.append(helper.make_node("Add", [mean, "bad"], ["probabilities"]))
    with pytest.raises(InferenceError, match=r"out of \[0, 1\]"):
        ModelSession(*write_bundle(tmp_path / "range", nodes, inits, ["N", 2]))


def test_manifest_naming_another_input_refuses_to_load(tmp_path: Path) -> None:
    folder, manifest = half_and_half(tmp_path)
    renamed = manifest.model_copy(update={"input": SPEC.model_copy(update={"name": "pixels"})})
    with pytest.raises(InferenceError, match="no input 'pixels'"):
        ModelSession(folder, renamed)


def test_manifest_with_another_size_refuses_to_load(tmp_path: Path) -> None:
    folder, manifest = half_and_half(tmp_path)
    bigger = manifest.model_copy(update={"input": SPEC.model_copy(update={"height": 16})})
    with pytest.raises(InferenceError, match="dim 2"):
        ModelSession(folder, bigger)


def test_tensor_of_wrong_shape_raises_runtime_error(tmp_path: Path) -> None:
    session = ModelSession(*half_and_half(tmp_path))
    with pytest.raises(InferenceError, match="runtime error"):
        session.predict_tensor(np.zeros((1, 3, 4, 4), np.float32))
