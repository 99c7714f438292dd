"""Camera frame -> model input tensor, exactly as the bundle's manifest describes it.

Two C calls for a float model (the resize, then OpenCV's blob builder doing colour order,
(x * scale - mean) / std and layout in one pass): each call into C lets another thread take
the GIL, and the station runs two models side by side, so fewer calls mean fewer waits.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import numpy.typing as npt

from linesight.artifacts import InputSpec

U8 = npt.NDArray[np.uint8]


def preprocess(frame_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Return a batch of one (NCHW or NHWC) in the manifest's size, colour order and dtype."""
    frame = validate_frame(frame_bgr)
    resized = resize(frame, spec.height, spec.width)
    if spec.dtype == "float32":
        return float_blob(resized, spec)
    return to_batch(convert_colour(resized, spec.colour), spec.layout)


def float_blob(frame: U8, spec: InputSpec) -> npt.NDArray[np.float32]:
    """A resized BGR (or gray) frame -> (x * scale - mean) / std per channel, batch of one."""
    colour_frame = frame.ndim == 3
    if colour_frame and spec.colour != "gray":
        pixels = frame  # BGR -> RGB is the blob builder's channel swap
    else:
        pixels = convert_colour(frame, spec.colour)
    blob = cv2.dnn.blobFromImageWithParams(pixels, _blob_params(spec, swap=colour_frame))
    result: npt.NDArray[np.float32] = np.asarray(blob, np.float32)
    return result


@lru_cache(maxsize=32)
def _blob_params(spec: InputSpec, *, swap: bool) -> cv2.dnn.Image2BlobParams:
    # OpenCV computes (x - mean) * scalefactor, with mean and scalefactor in the output's
    # channel order: mean' = mean / scale and scalefactor' = scale / std give the manifest's
    # (x * scale - mean) / std.
    channels = spec.channels
    mean = _per_channel(spec.mean, channels, "mean").reshape(-1)
    std = _per_channel(spec.std, channels, "std").reshape(-1)
    params = cv2.dnn.Image2BlobParams()
    params.scalefactor = _scalar(np.float64(spec.scale) / std.astype(np.float64))
    params.mean = _scalar(mean.astype(np.float64) / np.float64(spec.scale))
    params.swapRB = swap and spec.colour == "rgb"
    params.ddepth = cv2.CV_32F
    params.datalayout = cv2.DNN_LAYOUT_NCHW if spec.layout == "NCHW" else cv2.DNN_LAYOUT_NHWC
    params.size = (spec.width, spec.height)
    return params


def _scalar(values: npt.NDArray[np.float64]) -> tuple[float, float, float, float]:
    padded = [float(v) for v in values] + [float(values[-1])] * (4 - len(values))
    return padded[0], padded[1], padded[2], 0.0


def validate_frame(frame: object) -> U8:
    """The frame as HxWx3 (BGR) or HxW (gray) uint8; ``ValueError`` says what is wrong."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame dtype must be uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3 and frame.shape[2] != 3:
        raise ValueError(f"frame must have 3 channels (BGR) or be gray, got {frame.shape[2]}")
    if frame.ndim not in (2, 3):
        raise ValueError(f"frame must be HxWx3 or HxW, got ndim={frame.ndim}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: shape {frame.shape}")
    return frame


def resize(frame: U8, height: int, width: int) -> U8:
    if frame.shape[:2] == (height, width):
        return frame
    # INTER_AREA averages over the source pixels: no aliasing when shrinking camera frames.
    return np.asarray(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA), np.uint8)


def convert_colour(frame: U8, colour: str) -> U8:
    """BGR (or gray) frame -> HxWxC in the model's colour order (C = 1 for gray)."""
    codes = {
        (3, "rgb"): cv2.COLOR_BGR2RGB,
        (3, "gray"): cv2.COLOR_BGR2GRAY,
        (1, "rgb"): cv2.COLOR_GRAY2RGB,
        (1, "bgr"): cv2.COLOR_GRAY2BGR,
    }
    channels = 1 if frame.ndim == 2 else 3
    code = codes.get((channels, colour))
    converted = frame if code is None else np.asarray(cv2.cvtColor(frame, code), np.uint8)
    if converted.ndim == 2:
        converted = converted[:, :, None]
    return np.ascontiguousarray(converted)


def _per_channel(values: tuple[float, ...], channels: int, field: str) -> npt.NDArray[np.float32]:
    if len(values) not in (1, channels):
        raise ValueError(f"{field} needs 1 or {channels} values, got {len(values)}")
    return np.asarray(values, np.float32).reshape(1, 1, -1)


def to_batch(tensor: np.ndarray, layout: str) -> np.ndarray:
    """HxWxC -> 1xCxHxW (NCHW) or 1xHxWxC (NHWC), contiguous for onnxruntime."""
    if layout == "NCHW":
        return np.ascontiguousarray(tensor.transpose(2, 0, 1)[None])
    if layout == "NHWC":
        return np.ascontiguousarray(tensor[None])
    raise ValueError(f"unknown layout {layout!r}")
