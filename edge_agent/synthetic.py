"""Deterministic synthetic parts: machined washers and brackets on a conveyor belt.

Every part is a pure function of ``(seed, index)``, so any part can be regenerated from its id
(``syn-{seed}-{index:08d}``) without replaying the stream: the recipe, the tests, the benchmarks
and the live synthetic source all see the same pixels for the same id.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count

import cv2
import numpy as np
import numpy.typing as npt

DEFECT_CLASSES: tuple[str, ...] = ("scratch", "pit", "missing_hole", "crack", "stain")

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

_PART_ID = re.compile(r"^syn-(\d+)-(\d{8,})$")
_MIN_SIZE = 32
_MAX_SIZE = 2048
# Brackets are the minority product on the line; washers dominate.
_BRACKET_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class SyntheticPart:
    """One generated part: its id, its image (BGR, uint8) and the truth about it."""

    part_id: str
    index: int
    image: U8
    defect: str | None

    @property
    def is_defective(self) -> bool:
        return self.defect is not None


@dataclass(frozen=True, slots=True)
class _Shape:
    """Where the part lies: centre, hole radius and the largest radius still on the part."""

    cx: float
    cy: float
    hole_r: float
    outer_r: float


def id_prefix(seed: int) -> str:
    return f"syn-{seed}-"


def part_id_for(seed: int, index: int) -> str:
    return f"{id_prefix(seed)}{index:08d}"


def parse_part_id(part_id: str) -> tuple[int, int]:
    """Return ``(seed, index)`` of a synthetic part id; ``ValueError`` for any other id."""
    match = _PART_ID.fullmatch(part_id)
    if match is None:
        raise ValueError(f"not a synthetic part id: {part_id!r}")
    return int(match.group(1)), int(match.group(2))


def next_index(part_ids: Iterable[str], seed: int) -> int:
    """The index after the highest synthetic part id of ``seed`` in ``part_ids``; 0 if none.

    Where a restarted synthetic source goes on, so that it does not judge the same parts again
    under ids the station and the controller already hold."""
    highest = -1
    for part_id in part_ids:
        try:
            id_seed, index = parse_part_id(part_id)
        except ValueError:
            continue
        if id_seed == seed:
            highest = max(highest, index)
    return highest + 1


class PartGenerator:
    """Random-access generator of synthetic parts, deterministic by ``(seed, index)``."""

    def __init__(
        self,
        seed: int,
        defect_rate: float = 0.3,
        size: int = 128,
        defect_classes: Sequence[str] = DEFECT_CLASSES,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(defect_rate, bool) or not 0.0 <= float(defect_rate) <= 1.0:
            raise ValueError(f"defect_rate must be within [0, 1], got {defect_rate!r}")
        if isinstance(size, bool) or not isinstance(size, int) or not (
            _MIN_SIZE <= size <= _MAX_SIZE
        ):
            raise ValueError(f"size must be an int in [{_MIN_SIZE}, {_MAX_SIZE}], got {size!r}")
        classes = tuple(defect_classes)
        unknown = [c for c in classes if c not in DEFECT_CLASSES]
        if unknown or len(set(classes)) != len(classes):
            raise ValueError(
                f"defect_classes must be distinct names from {DEFECT_CLASSES}, got {classes!r}"
            )
        if not classes and defect_rate > 0:
            raise ValueError("defect_classes is empty but defect_rate > 0")
        self.seed = seed
        self.defect_rate = float(defect_rate)
        self.size = size
        self.defect_classes = classes

    def part(self, index: int) -> SyntheticPart:
        rng = self._rng(index)
        defect = self._draw_defect(rng)
        image = render_part(rng, self.size, defect)
        return SyntheticPart(part_id_for(self.seed, index), index, image, defect)

    def defect(self, index: int) -> str | None:
        """Part ``index``'s defect class (None: a good part), without drawing its image: the
        ground truth a simulated operator or a summary needs, at a thousandth of the cost."""
        return self._draw_defect(self._rng(index))

    def _rng(self, index: int) -> np.random.Generator:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        return np.random.default_rng([self.seed, index])

    def _draw_defect(self, rng: np.random.Generator) -> str | None:
        # The first draws of a part's generator: its image is drawn from what follows.
        if rng.random() < self.defect_rate:
            return self.defect_classes[int(rng.integers(len(self.defect_classes)))]
        return None

    def __iter__(self) -> Iterator[SyntheticPart]:
        for index in count():
            yield self.part(index)


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> F32:
    return np.arange(size, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _tool_marks(size: int) -> F32:
    """Concentric turning marks on a canvas twice the image size, centred; sliced per part."""
    unit = size / 128.0
    axis = np.arange(2 * size, dtype=np.float32) - np.float32(size)
    radius = np.sqrt(axis[None, :] ** 2 + axis[:, None] ** 2)
    return np.sin(radius * np.float32(1.7 / unit)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> F32:
    """Unit Gaussian sensor noise, drawn once; each part reads a random window of it."""
    rng = np.random.default_rng(0x5EED)
    return rng.standard_normal((3 * size, 3 * size, 3), dtype=np.float32)


def render_part(rng: np.random.Generator, size: int, defect: str | None) -> U8:
    """Draw one part on the belt; all randomness comes from ``rng``."""
    unit = size / 128.0
    belt = _belt(rng, size, unit)
    is_bracket = rng.random() < _BRACKET_SHARE
    mask, shape = _part_mask(rng, size, unit, is_bracket, drill_hole=defect != "missing_hole")
    metal = _metal(rng, size, shape)
    _nuisances(rng, metal, shape, unit)
    if defect is not None:
        _DEFECT_PAINTERS[defect](rng, metal, shape, unit)
    alpha = mask[..., None]
    image = belt + (metal - belt) * alpha
    image = _lighting(rng, image, size)
    return _sensor(rng, image, size, unit)


def _belt(rng: np.random.Generator, size: int, unit: float) -> F32:
    base = rng.uniform(38.0, 72.0)
    tint = rng.uniform(-4.0, 4.0, size=3).astype(np.float32)
    # Rubber belts show fine transverse ribs; the phase moves with the belt.
    phase = np.float32(rng.uniform(0, 2 * math.pi))
    ribs = np.float32(3.0) * np.sin(_axis(size) * np.float32(0.9 / unit) + phase)
    row = (np.float32(base) + ribs)[:, None, None] + tint
    return np.broadcast_to(row, (size, size, 3)).astype(np.float32)


def _part_mask(
    rng: np.random.Generator, size: int, unit: float, is_bracket: bool, *, drill_hole: bool
) -> tuple[F32, _Shape]:
    jitter = 10.0 * unit
    cx = size / 2 + rng.uniform(-jitter, jitter)
    cy = size / 2 + rng.uniform(-jitter, jitter)
    canvas = np.zeros((size, size), np.uint8)
    if is_bracket:
        half_w = rng.uniform(24.0, 30.0) * unit
        half_h = rng.uniform(38.0, 44.0) * unit
        angle = rng.uniform(0.0, 180.0)
        box = cv2.boxPoints(((cx, cy), (2 * half_w, 2 * half_h), angle))
        cv2.fillPoly(canvas, [np.round(box * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        outer = half_w
        hole = rng.uniform(0.35, 0.45) * half_w
    else:
        outer = rng.uniform(38.0, 45.0) * unit
        hole = rng.uniform(0.36, 0.46) * outer
        _disc(canvas, cx, cy, outer, 255)
    if drill_hole:
        _disc(canvas, cx, cy, hole, 0)
    mask = canvas.astype(np.float32) * np.float32(1.0 / 255.0)
    return mask, _Shape(cx, cy, hole, outer)


def _disc(
    canvas: U8 | F32, cx: float, cy: float, radius: float, value: float | tuple[float, ...]
) -> None:
    # Sub-pixel centre and radius (shift=4) keep edges smooth at every jitter.
    centre = (round(cx * 16), round(cy * 16))
    cv2.circle(canvas, centre, max(1, round(radius * 16)), value, -1, cv2.LINE_AA, 4)


def _metal(rng: np.random.Generator, size: int, shape: _Shape) -> F32:
    base = rng.uniform(140.0, 185.0)
    theta = rng.uniform(0.0, 2 * math.pi)
    axis = _axis(size)
    # Light falls off across the part along a random direction.
    falloff = np.float32(rng.uniform(12.0, 28.0) / shape.outer_r)
    gx = (axis - np.float32(shape.cx)) * np.float32(math.cos(theta)) * falloff
    gy = (axis - np.float32(shape.cy)) * np.float32(math.sin(theta)) * falloff
    top = size - round(shape.cy)
    left = size - round(shape.cx)
    marks = _tool_marks(size)[top : top + size, left : left + size]
    grey = np.float32(base) + gx[None, :] + gy[:, None] + np.float32(rng.uniform(2.0, 5.0)) * marks
    tint = np.array([rng.uniform(2.0, 8.0), 0.0, rng.uniform(-6.0, 0.0)], np.float32)
    metal: F32 = grey[..., None] + tint
    return metal


def _blur(image: F32, sigma: float) -> F32:
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), dtype=np.float32)


def _surface_point(rng: np.random.Generator, shape: _Shape, margin: float) -> tuple[float, float]:
    """A point on the part's surface, at least ``margin`` px inside its edges."""
    lo = shape.hole_r + margin
    hi = max(lo + 1.0, shape.outer_r - margin)
    rho = rng.uniform(lo, hi)
    phi = rng.uniform(0.0, 2 * math.pi)
    return shape.cx + rho * math.cos(phi), shape.cy + rho * math.sin(phi)


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * 16), round(y * 16)


def _nuisances(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    """Harmless marks every good part may carry, so a model cannot flag any blemish."""
    if rng.random() < 0.5:
        # A soft specular streak: wide and faint, unlike a scratch.
        x0, y0 = _surface_point(rng, shape, 4 * unit)
        phi = rng.uniform(0.0, math.pi)
        half = rng.uniform(8.0, 16.0) * unit
        a = _pt(x0 - half * math.cos(phi), y0 - half * math.sin(phi))
        b = _pt(x0 + half * math.cos(phi), y0 + half * math.sin(phi))
        glow = np.zeros(metal.shape[:2], np.float32)
        cv2.line(glow, a, b, 1.0, max(2, round(5 * unit)), cv2.LINE_AA, 4)
        glow = _blur(glow, 2.5 * unit)
        metal += (np.float32(rng.uniform(8.0, 16.0)) * glow)[..., None]


def _paint_scratch(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    x0, y0 = _surface_point(rng, shape, 3 * unit)
    phi = rng.uniform(0.0, math.pi)
    length = rng.uniform(12.0, 30.0) * unit
    bend = rng.uniform(-0.15, 0.15)
    pts = []
    for t in np.linspace(-0.5, 0.5, 5):
        ang = phi + bend * t
        pts.append(_pt(x0 + t * length * math.cos(ang), y0 + t * length * math.sin(ang)))
    shade = rng.uniform(45.0, 80.0) * (1 if rng.random() < 0.7 else -1)
    colour = _offset(metal, x0, y0, shade)
    thickness = max(1, round(rng.uniform(0.8, 1.6) * unit))
    cv2.polylines(metal, [np.array(pts, np.int32)], False, colour, thickness, cv2.LINE_AA, 4)


def _paint_pit(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    x0, y0 = _surface_point(rng, shape, 5 * unit)
    radius = rng.uniform(2.0, 3.8) * unit
    # A dent: dark bowl with a lit rim on the side facing the light.
    light = rng.uniform(0.0, 2 * math.pi)
    rim = radius * 0.55
    _disc(metal, x0 + rim * math.cos(light), y0 + rim * math.sin(light), radius,
          _offset(metal, x0, y0, rng.uniform(30.0, 55.0)))
    _disc(metal, x0, y0, radius, _offset(metal, x0, y0, -rng.uniform(70.0, 110.0)))


def _paint_missing_hole(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    # The drill never ran: only a faint centre mark where the hole should be.
    if rng.random() < 0.6:
        colour = _offset(metal, shape.cx, shape.cy, -rng.uniform(10.0, 25.0))
        cv2.circle(metal, _pt(shape.cx, shape.cy), round(1.5 * unit * 16), colour, -1,
                   cv2.LINE_AA, 4)


def _paint_crack(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    # Cracks start at an edge (hole or rim) and run roughly radially, jagged.
    phi = rng.uniform(0.0, 2 * math.pi)
    from_hole = rng.random() < 0.5
    width = shape.outer_r - shape.hole_r
    length = rng.uniform(0.55, 0.95) * width
    start = shape.hole_r - 1 if from_hole else shape.outer_r + 1
    step_dir = 1.0 if from_hole else -1.0
    pts = []
    steps = 6
    for k in range(steps + 1):
        rho = start + step_dir * length * k / steps
        wobble = rng.uniform(-0.12, 0.12) if 0 < k else 0.0
        ang = phi + wobble
        pts.append(_pt(shape.cx + rho * math.cos(ang), shape.cy + rho * math.sin(ang)))
    colour = _offset(metal, shape.cx + start * math.cos(phi), shape.cy + start * math.sin(phi),
                     -rng.uniform(85.0, 130.0))
    thickness = max(1, round(rng.uniform(1.2, 2.2) * unit))
    cv2.polylines(metal, [np.array(pts, np.int32)], False, colour, thickness, cv2.LINE_AA, 4)


def _paint_stain(rng: np.random.Generator, metal: F32, shape: _Shape, unit: float) -> None:
    x0, y0 = _surface_point(rng, shape, 4 * unit)
    axes = (round(rng.uniform(5.0, 10.0) * unit * 16), round(rng.uniform(3.5, 7.0) * unit * 16))
    blot = np.zeros(metal.shape[:2], np.float32)
    cv2.ellipse(blot, _pt(x0, y0), axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA, 4)
    blot = _blur(blot, 1.5 * unit)
    strength = np.float32(rng.uniform(0.35, 0.6))
    # Oil and coolant residue: brownish, darker than the bare metal.
    residue = np.array([30.0, 60.0, 85.0], np.float32) * np.float32(rng.uniform(0.8, 1.3))
    weight = (blot * strength)[..., None]
    metal += (residue - metal) * weight


def _offset(metal: F32, x: float, y: float, shade: float) -> tuple[float, float, float]:
    """A colour ``shade`` grey levels away from the metal around (x, y)."""
    h, w = metal.shape[:2]
    row = min(max(round(y), 0), h - 1)
    col = min(max(round(x), 0), w - 1)
    b, g, r = (float(v) + shade for v in metal[row, col])
    return b, g, r


_DEFECT_PAINTERS = {
    "scratch": _paint_scratch,
    "pit": _paint_pit,
    "missing_hole": _paint_missing_hole,
    "crack": _paint_crack,
    "stain": _paint_stain,
}


def _lighting(rng: np.random.Generator, image: F32, size: int) -> F32:
    gain = rng.uniform(0.72, 1.2)
    theta = rng.uniform(0.0, 2 * math.pi)
    slope = np.float32(gain * rng.uniform(0.0, 0.35) / size)
    centred = _axis(size) - np.float32(size / 2)
    field = (
        np.float32(gain)
        + slope * centred[None, :] * np.float32(math.cos(theta))
        + slope * centred[:, None] * np.float32(math.sin(theta))
    )
    image *= field[..., None]
    return image


def _sensor(rng: np.random.Generator, image: F32, size: int, unit: float) -> U8:
    if rng.random() < 0.5:
        # Slight defocus or motion on a moving belt.
        image = _blur(image, rng.uniform(0.4, 1.0) * unit)
    top, left = (int(v) for v in rng.integers(0, 2 * size, size=2))
    noise = _noise_bank(size)[top : top + size, left : left + size]
    image += noise * np.float32(rng.uniform(1.5, 5.0))
    return np.clip(image, 0.0, 255.0, out=image).astype(np.uint8)
