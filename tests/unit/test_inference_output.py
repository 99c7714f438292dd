"""What a model's output must be before a part may be decided on it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference import InferenceError, probability_row

pytestmark = pytest.mark.unit

INF, NAN = float("inf"), float("nan")


def row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float32)


def test_a_distribution_passes_through() -> None:
    assert probability_row(row(0.25, 0.75), 2) == (0.25, 0.75)
    assert probability_row(row(1.0, 0.0, 0.0), 3) == (1.0, 0.0, 0.0)


def test_rounding_just_outside_0_and_1_is_clamped() -> None:
    low, high = probability_row(row(-0.0004, 1.0004), 2)
    assert (low, high) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("output", "labels", "message"),
    [
        (row(NAN, 1.0), 2, "not finite"),
        (row(INF, 0.0), 2, "not finite"),
        (row(INF, -INF), 2, "not finite"),
        (row(-0.5, 1.5), 2, "out of \\[0, 1\\]"),
        (row(0.3, 0.3), 2, "sum to 0.6000"),
        (row(0.5, 0.5), 3, "shape \\(1, 2\\), expected \\(1, 3\\)"),
        (np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.float32), 2, "shape \\(2, 2\\)"),
        ([[0.5, 0.5]], 2, "list, not a tensor"),
    ],
)
def test_anything_else_is_refused_with_the_reason(
    output: object, labels: int, message: str
) -> None:
    with pytest.raises(InferenceError, match=message):
        probability_row(output, labels)


@pytest.mark.parametrize(
    "output",
    [
        np.array([[0, 1]], np.int64),
        np.array([[False, True]]),
        np.array([["0.5", "0.5"]], object),
        np.array([[0.5 + 0j, 0.5]], np.complex64),
    ],
    ids=["int64", "bool", "string", "complex"],
)
def test_a_row_that_is_not_floating_point_is_refused(output: np.ndarray) -> None:
    with pytest.raises(InferenceError, match="not floating-point probabilities"):
        probability_row(output, 2)


def test_float16_and_float64_rows_give_python_floats() -> None:
    for dtype in (np.float16, np.float64):
        values = probability_row(np.array([[0.25, 0.75]], dtype), 2)
        assert values == (0.25, 0.75)
        assert all(type(v) is float for v in values)
