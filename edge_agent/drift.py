"""Input drift: is the line still showing the model what it saw when it was promoted?

Per part we keep four numbers: brightness, contrast and sharpness of the image, and the active
model's confidence. The first full window after a promotion (or first start) is the reference;
each later window is compared with it by the population stability index (PSI). PSI above 0.25 is
the usual "the population has shifted" line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from linesight.protocol import DriftSignal

FEATURES = ("brightness", "contrast", "sharpness", "confidence")
PSI_ALERT = 0.25
BINS = 10
_EPS = 1e-4


def image_stats(image_bgr: np.ndarray) -> tuple[float, float, float]:
    """Brightness (mean), contrast (std) and sharpness (variance of the Laplacian) on a small
    grey copy: cheap enough for every part."""
    small = cv2.resize(image_bgr, (48, 48), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
    mean, std = cv2.meanStdDev(gray)
    _, laplacian_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
    return float(mean[0, 0]), float(std[0, 0]), float(laplacian_std[0, 0]) ** 2


def bin_edges(reference: Sequence[float], bins: int = BINS) -> list[float]:
    """Inner edges at the reference's quantiles, so each bin holds about the same share."""
    quantiles = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1))
    return [float(q) for q in np.unique(quantiles[1:-1])]


def proportions(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    counts = np.bincount(
        np.searchsorted(np.asarray(edges), np.asarray(values, dtype=np.float64), side="right"),
        minlength=len(edges) + 1,
    )
    return [float(c) / max(len(values), 1) for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index between two binned distributions of equal length."""
    if len(expected) != len(actual):
        raise ValueError("psi needs distributions over the same bins")
    e = np.clip(np.asarray(expected, dtype=np.float64), _EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class Reference:
    edges: dict[str, list[float]]
    shares: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges, "shares": self.shares}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Reference:
        edges = {name: [float(v) for v in document["edges"][name]] for name in FEATURES}
        shares = {name: [float(v) for v in document["shares"][name]] for name in FEATURES}
        return cls(edges, shares)

    @classmethod
    def from_window(cls, window: dict[str, list[float]]) -> Reference:
        edges = {name: bin_edges(window[name]) for name in FEATURES}
        return cls(edges, {name: proportions(window[name], edges[name]) for name in FEATURES})


@dataclass
class DriftMonitor:
    """Collects a window of parts; the first full window becomes the reference if none is set."""

    window: int
    reference: Reference | None = None
    last: DriftSignal | None = None
    _current: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in FEATURES})

    def reset(self) -> None:
        """A new active model: its first window becomes the new reference."""
        self.reference, self.last = None, None
        self._current = {name: [] for name in FEATURES}

    def add(self, stats: tuple[float, float, float], confidence: float | None) -> bool:
        """Record one part; True when a window closed (and a reference or signal changed)."""
        if confidence is None:
            return False
        for name, value in zip(FEATURES, (*stats, confidence), strict=True):
            self._current[name].append(value)
        if len(self._current["confidence"]) < self.window:
            return False
        window, self._current = self._current, {name: [] for name in FEATURES}
        if self.reference is None:
            self.reference = Reference.from_window(window)
            return True
        scores = {
            name: psi(
                self.reference.shares[name], proportions(window[name], self.reference.edges[name])
            )
            for name in FEATURES
        }
        self.last = DriftSignal(
            psi_brightness=scores["brightness"],
            psi_contrast=scores["contrast"],
            psi_sharpness=scores["sharpness"],
            psi_confidence=scores["confidence"],
            window_parts=self.window,
            drifting=max(scores.values()) > PSI_ALERT,
        )
        return True
