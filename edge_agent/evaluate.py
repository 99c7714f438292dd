"""Measure a bundle on held-out synthetic parts: the numbers a manifest records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.inference import InferenceError, ModelSession
from edge_agent.synthetic import DEFECT_CLASSES, PartGenerator
from linesight.artifacts import EvalMetrics, Manifest


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a part really was, and whether the model called it defective."""

    defect: str | None
    flagged: bool


def evaluate_bundle(
    bundle_dir: Path,
    manifest: Manifest,
    *,
    seed: int,
    size: int,
    defect_rate: float = 0.3,
) -> EvalMetrics:
    """Run the bundle on parts ``0..size-1`` of ``PartGenerator(seed, defect_rate)``."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    session = ModelSession(bundle_dir, manifest)
    generator = PartGenerator(seed, defect_rate=defect_rate)
    outcomes = []
    for index in range(size):
        part = generator.part(index)
        try:
            flagged = session.predict(part.image).label == manifest.defect_label
        except InferenceError:  # at a station the fail-safe holds such a part: never passed
            flagged = True
        outcomes.append(Outcome(part.defect, flagged))
    return metrics_from_outcomes(outcomes, seed=seed, defect_rate=defect_rate)


def metrics_from_outcomes(
    outcomes: Iterable[Outcome],
    *,
    seed: int,
    defect_rate: float,
    classes: Sequence[str] = DEFECT_CLASSES,
) -> EvalMetrics:
    """Accuracy, defect recall, false-reject rate and recall per defect class.

    A rate with nothing to count (e.g. no good parts) is reported as 0.0 for false rejects and
    1.0 for recalls, so an empty class neither flatters nor condemns a model.
    """
    rows = list(outcomes)
    if not rows:
        raise ValueError("no outcomes to measure")
    correct = sum(1 for r in rows if r.flagged == (r.defect is not None))
    defective = [r for r in rows if r.defect is not None]
    good = [r for r in rows if r.defect is None]
    per_class = {
        name: _rate([r for r in defective if r.defect == name], empty=1.0) for name in classes
    }
    return EvalMetrics(
        accuracy=correct / len(rows),
        defect_recall=_rate(defective, empty=1.0),
        false_reject_rate=_rate(good, empty=0.0),
        per_class_recall=per_class,
        seed=seed,
        size=len(rows),
        defect_rate=defect_rate,
    )


def _rate(rows: Sequence[Outcome], *, empty: float) -> float:
    return sum(1 for r in rows if r.flagged) / len(rows) if rows else empty
