"""The ONNX model runner on the station's critical path.

A session is opened only for a bundle that ``linesight.artifacts.verify_bundle`` has already
accepted; this module checks that the graph matches the manifest and that every output is a
valid probability row, so a broken model raises ``InferenceError`` instead of passing a part.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.preprocess import preprocess
from linesight.artifacts import MODEL_FILE, Manifest

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
# Softmax in float32 can miss 0 and 1 and a unit row sum by a few ulps.
_PROBABILITY_TOLERANCE = 1e-3
_ONNX_DTYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}
# An integer or boolean row is an argmax (one-hot), not probabilities: it must not decide a part.
_PROBABILITY_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    confidence: float
    probabilities: tuple[float, ...]
    latency_ms: float


class InferenceError(Exception):
    """The model could not give a trustworthy answer; the message says why."""


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested providers this build offers, in order; CPU when none is left."""
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        log.warning("execution providers %s unavailable (have %s)", missing, list(available))
    if not chosen:
        log.warning("no requested execution provider available; falling back to %s", CPU_PROVIDER)
        chosen = [CPU_PROVIDER]
    return chosen


def session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    """Options for a small CPU that runs the active and the candidate model side by side."""
    if intra_op_threads < 1 or inter_op_threads < 1:
        raise ValueError("thread counts must be >= 1")
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    # Spinning workers would steal the core the other model (and the agent loop) needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def expected_input_shape(manifest: Manifest) -> tuple[int, int, int]:
    spec = manifest.input
    if spec.layout == "NCHW":
        return spec.channels, spec.height, spec.width
    return spec.height, spec.width, spec.channels


def check_graph(session: ort.InferenceSession, manifest: Manifest) -> None:
    """Raise InferenceError when the model's input or output differs from the manifest."""
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    spec = manifest.input
    if spec.name not in inputs:
        raise InferenceError(f"model has no input {spec.name!r} (inputs: {sorted(inputs)})")
    if len(inputs) != 1:
        raise InferenceError(f"model needs {len(inputs)} inputs, the manifest describes one")
    node = inputs[spec.name]
    if len(node.shape) != 4:
        raise InferenceError(f"input {spec.name!r} has rank {len(node.shape)}, expected 4")
    if node.type != _ONNX_DTYPES[spec.dtype]:
        raise InferenceError(f"input {spec.name!r} is {node.type}, manifest says {spec.dtype}")
    for axis, (actual, wanted) in enumerate(
        zip(node.shape[1:], expected_input_shape(manifest), strict=True), start=1
    ):
        if isinstance(actual, int) and actual != wanted:
            raise InferenceError(
                f"input {spec.name!r} dim {axis} is {actual}, manifest ({spec.layout}) needs "
                f"{wanted}"
            )
    out_name = manifest.output.name
    if out_name not in outputs:
        raise InferenceError(f"model has no output {out_name!r} (outputs: {sorted(outputs)})")
    out_type = outputs[out_name].type
    if out_type not in _PROBABILITY_TYPES:
        raise InferenceError(
            f"output {out_name!r} is {out_type}, not floating-point probabilities"
        )
    out_shape = outputs[out_name].shape
    if len(out_shape) != 2:
        raise InferenceError(f"output {out_name!r} has rank {len(out_shape)}, expected 2")
    labels = len(manifest.labels)
    if isinstance(out_shape[1], int) and out_shape[1] != labels:
        raise InferenceError(
            f"output {out_name!r} has {out_shape[1]} columns, manifest lists {labels} labels"
        )


def probability_row(output: object, labels: int) -> tuple[float, ...]:
    """The one row of a batch-of-one output, checked to be a probability distribution."""
    if not isinstance(output, np.ndarray):
        raise InferenceError(f"output is {type(output).__name__}, not a tensor")
    if output.dtype.kind != "f":
        raise InferenceError(f"output is {output.dtype}, not floating-point probabilities")
    if output.shape != (1, labels):
        raise InferenceError(f"output shape {output.shape}, expected (1, {labels})")
    # Plain Python on a two-element row: numpy's per-call overhead dominated here.
    row: list[float] = output[0].tolist()
    total = sum(row)
    if not math.isfinite(total):  # NaN and infinity (of either sign) all reach the sum
        raise InferenceError(f"output is not finite (nan/inf): {row}")
    tol = _PROBABILITY_TOLERANCE
    low, high = min(row), max(row)
    if low < -tol or high > 1 + tol:
        raise InferenceError(f"output probabilities out of [0, 1]: {row}")
    if not math.isclose(total, 1.0, abs_tol=tol):
        raise InferenceError(f"output probabilities sum to {total:.4f}, not 1")
    if low < 0.0 or high > 1.0:
        return tuple(min(max(v, 0.0), 1.0) for v in row)
    return tuple(row)


class ModelSession:
    """One verified bundle opened in onnxruntime, warmed up and ready to judge frames."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        *,
        providers: Sequence[str] = (CPU_PROVIDER,),
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        self.manifest = manifest
        self.bundle_dir = bundle_dir
        chosen = choose_providers(providers, ort.get_available_providers())
        options = session_options(intra_op_threads, inter_op_threads)
        try:
            self._session = ort.InferenceSession(
                str(bundle_dir / MODEL_FILE), sess_options=options, providers=chosen
            )
        except Exception as exc:  # onnxruntime's errors share no public base class
            path = bundle_dir / MODEL_FILE
            raise InferenceError(f"onnxruntime cannot open {path}: {exc}") from exc
        check_graph(self._session, manifest)
        self._input = manifest.input.name
        self._output = manifest.output.name
        # The first run allocates and plans; pay that at load, not on the first part. A black
        # frame may well be a tie, so only the form of the answer is checked here.
        spec = manifest.input
        self._probabilities(preprocess(np.zeros((spec.height, spec.width, 3), np.uint8), spec))

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def predict(self, frame_bgr: np.ndarray) -> Prediction:
        """Preprocess a BGR frame and judge it; latency covers preprocessing and the run."""
        start = time.perf_counter()
        tensor = preprocess(frame_bgr, self.manifest.input)
        return self._run(tensor, start)

    def predict_tensor(self, tensor: np.ndarray) -> Prediction:
        """Judge an already preprocessed batch of one; latency covers the run only."""
        return self._run(tensor, time.perf_counter())

    def _probabilities(self, tensor: np.ndarray) -> tuple[float, ...]:
        try:
            outputs = self._session.run([self._output], {self._input: tensor})
        except Exception as exc:  # onnxruntime's errors share no public base class
            raise InferenceError(f"runtime error in {self.manifest.name}: {exc}") from exc
        return probability_row(outputs[0], len(self.manifest.labels))

    def _run(self, tensor: np.ndarray, start: float) -> Prediction:
        probabilities = self._probabilities(tensor)
        latency_ms = (time.perf_counter() - start) * 1000.0
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        if probabilities.count(probabilities[best]) > 1:
            # Taking the first listed label would decide by label order (often "ok" first).
            raise InferenceError(f"no label wins: probabilities {list(probabilities)} tie")
        return Prediction(
            label=self.manifest.labels[best],
            confidence=probabilities[best],
            probabilities=probabilities,
            latency_ms=latency_ms,
        )
