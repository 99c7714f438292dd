from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.preprocess import preprocess
from linesight.artifacts import InputSpec

pytestmark = pytest.mark.unit

BLUE, GREEN, RED = 10, 120, 250


def spec(**overrides: Any) -> InputSpec:
    fields: dict[str, Any] = {
        "name": "image", "layout": "NCHW", "height": 4, "width": 6, "colour": "rgb",
        "dtype": "float32", "scale": 1.0, "mean": (0.0,), "std": (1.0,),
    }
    fields.update(overrides)
    return InputSpec(**fields)


def bgr_frame(height: int = 8, width: int = 12) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = (BLUE, GREEN, RED)
    return frame


def test_nchw_rgb_float_resizes_and_reorders_channels() -> None:
    batch = preprocess(bgr_frame(), spec())
    assert batch.shape == (1, 3, 4, 6)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    assert [float(batch[0, c, 0, 0]) for c in range(3)] == [RED, GREEN, BLUE]


def test_nhwc_bgr_keeps_camera_order() -> None:
    batch = preprocess(bgr_frame(), spec(layout="NHWC", colour="bgr"))
    assert batch.shape == (1, 4, 6, 3)
    assert batch[0, 0, 0].tolist() == [BLUE, GREEN, RED]


def test_scale_mean_std_apply_per_channel() -> None:
    s = spec(scale=1 / 255, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    batch = preprocess(bgr_frame(), s)
    expected = [
        (RED / 255 - 0.5) / 0.5,
        (GREEN / 255 - 0.25) / 0.25,
        (BLUE / 255 - 0.0) / 2.0,
    ]
    assert batch[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_single_mean_and_std_apply_to_all_channels() -> None:
    batch = preprocess(bgr_frame(), spec(scale=1 / 255, mean=(0.5,), std=(0.25,)))
    expected = [(v / 255 - 0.5) / 0.25 for v in (RED, GREEN, BLUE)]
    assert batch[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_gray_uint8_nhwc_is_raw_luminance() -> None:
    batch = preprocess(bgr_frame(), spec(layout="NHWC", colour="gray", dtype="uint8"))
    assert batch.shape == (1, 4, 6, 1)
    assert batch.dtype == np.uint8
    luminance = round(0.114 * BLUE + 0.587 * GREEN + 0.299 * RED)
    assert abs(int(batch[0, 0, 0, 0]) - luminance) <= 1


def test_gray_nchw_float() -> None:
    batch = preprocess(bgr_frame(), spec(colour="gray", scale=1 / 255, mean=(0.5,)))
    assert batch.shape == (1, 1, 4, 6)
    assert batch.dtype == np.float32


def test_uint8_ignores_scale_mean_std() -> None:
    batch = preprocess(bgr_frame(), spec(dtype="uint8", scale=0.5, mean=(9.0,), std=(3.0,)))
    assert batch.dtype == np.uint8
    assert batch[0, :, 0, 0].tolist() == [RED, GREEN, BLUE]


def reference(frame: np.ndarray, s: InputSpec) -> np.ndarray:
    """The manifest's definition in plain numpy: resize, colour order, (x*scale-mean)/std."""
    resized = cv2.resize(frame, (s.width, s.height), interpolation=cv2.INTER_AREA)
    pixels = resized[:, :, ::-1] if s.colour == "rgb" else resized
    x = (pixels.astype(np.float64) * s.scale - np.asarray(s.mean)) / np.asarray(s.std)
    x = x.transpose(2, 0, 1) if s.layout == "NCHW" else x
    return np.asarray(x[None])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("colour", ["rgb", "bgr"])
@pytest.mark.parametrize(
    ("mean", "std"), [((0.0,), (1.0,)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
)
def test_float_tensor_matches_the_manifest_definition(
    layout: str, colour: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    frame = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    s = spec(layout=layout, colour=colour, height=20, width=15, scale=1 / 255, mean=mean, std=std)
    batch = preprocess(frame, s)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    assert np.allclose(batch, reference(frame, s), atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 12), (8, 12, 1)])
def test_gray_frames_are_accepted(shape: tuple[int, ...]) -> None:
    frame = np.full(shape, 77, np.uint8)
    rgb = preprocess(frame, spec())
    assert rgb[0, :, 0, 0].tolist() == [77, 77, 77]
    gray = preprocess(frame, spec(colour="gray"))
    assert gray.shape == (1, 1, 4, 6)


def test_resize_averages_with_inter_area() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[:, ::2] = 200  # alternating columns: nearest-neighbour would keep 0 or 200
    batch = preprocess(frame, spec(height=2, width=2))
    assert np.allclose(batch, 100.0)


def test_frame_is_not_modified() -> None:
    frame = bgr_frame()
    before = frame.copy()
    preprocess(frame, spec(scale=1 / 255, mean=(0.5,)))
    assert np.array_equal(frame, before)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "dtype"),
        (np.zeros((8, 8, 4), np.uint8), "channels"),
        (np.zeros((2, 8, 8, 3), np.uint8), "ndim"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_bad_frames_raise_naming_the_problem(frame: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(frame, spec())
