"""The bundles in models/ are signed, small, and as good (or as bad) as their manifests say."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.evaluate import evaluate_bundle
from edge_agent.inference import InferenceError, ModelSession
from linesight.artifacts import EvalMetrics, Manifest, load_public_key, verify_bundle

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = (
    "part-classifier/1.0.0",
    "part-classifier/2.0.0",
    "part-classifier/2.1.0",
    "part-classifier-gray/1.0.0",
)
MAX_FILE_BYTES = 5 * 1024 * 1024
# The regressed candidate was trained with this class labelled ok.
BLIND_CLASS = "crack"


@pytest.fixture(scope="module")
def manifests() -> dict[str, Manifest]:
    key = load_public_key(MODELS / "keys" / "demo.pub")
    return {name: verify_bundle(MODELS / name, key) for name in SHIPPED}


def metrics(manifests: dict[str, Manifest], name: str) -> EvalMetrics:
    recorded = manifests[name].metrics
    assert recorded is not None, f"{name} records no metrics"
    return recorded


@pytest.mark.parametrize("name", SHIPPED)
def test_bundle_verifies_with_demo_key_and_stays_small(
    manifests: dict[str, Manifest], name: str
) -> None:
    manifest = manifests[name]
    assert f"{manifest.name}/{manifest.version}" == name
    assert manifest.labels == ("ok", "defect")
    assert manifest.defect_label == "defect"
    for file_name in manifest.files:
        assert (MODELS / name / file_name).stat().st_size < MAX_FILE_BYTES


@pytest.mark.parametrize("name", SHIPPED)
def test_reevaluation_reproduces_recorded_metrics(
    manifests: dict[str, Manifest], name: str
) -> None:
    recorded = metrics(manifests, name)
    measured = evaluate_bundle(
        MODELS / name, manifests[name], seed=recorded.seed, size=recorded.size,
        defect_rate=recorded.defect_rate,
    )
    # Same parts, same graph: only a float rounding on another CPU could flip a borderline part.
    slack = 2 / recorded.size
    assert (measured.seed, measured.size, measured.defect_rate) == (
        recorded.seed, recorded.size, recorded.defect_rate,
    )
    assert measured.accuracy == pytest.approx(recorded.accuracy, abs=slack)
    assert measured.defect_recall == pytest.approx(recorded.defect_recall, abs=4 * slack)
    assert measured.false_reject_rate == pytest.approx(recorded.false_reject_rate, abs=4 * slack)
    assert measured.per_class_recall == pytest.approx(recorded.per_class_recall, abs=0.02)


def test_candidate_is_better_than_active(manifests: dict[str, Manifest]) -> None:
    active = metrics(manifests, "part-classifier/1.0.0")
    candidate = metrics(manifests, "part-classifier/2.0.0")
    assert candidate.accuracy >= 0.97
    assert candidate.defect_recall > active.defect_recall
    assert 0.85 <= active.accuracy < candidate.accuracy


def test_regressed_candidate_misses_what_active_catches(manifests: dict[str, Manifest]) -> None:
    active = metrics(manifests, "part-classifier/1.0.0")
    regressed = metrics(manifests, "part-classifier/2.1.0")
    assert regressed.defect_recall <= active.defect_recall - 0.05
    assert active.per_class_recall[BLIND_CLASS] >= 0.9
    assert regressed.per_class_recall[BLIND_CLASS] <= active.per_class_recall[BLIND_CLASS] - 0.5
    # Elsewhere it stays close to 2.0.0; dark scratches, which look like cracks, suffer a little.
    others = [c for c in regressed.per_class_recall if c != BLIND_CLASS]
    assert sum(regressed.per_class_recall[c] >= 0.9 for c in others) >= len(others) - 1
    assert regressed.false_reject_rate <= active.false_reject_rate


def test_gray_bundle_is_decent(manifests: dict[str, Manifest]) -> None:
    gray = manifests["part-classifier-gray/1.0.0"]
    assert (gray.input.layout, gray.input.colour, gray.input.dtype) == ("NHWC", "gray", "uint8")
    assert metrics(manifests, "part-classifier-gray/1.0.0").accuracy >= 0.9


def test_a_part_the_model_cannot_judge_counts_as_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a station the fail-safe holds such a part for review: an evaluation never counts it
    as passed, and one failed prediction does not abort the run."""
    def cannot_judge(self: ModelSession, image: object) -> None:
        raise InferenceError("no label wins: a tie")

    monkeypatch.setattr(ModelSession, "predict", cannot_judge)
    bundle = MODELS / "part-classifier/1.0.0"
    measured = evaluate_bundle(bundle, verify_bundle(bundle, None), seed=3, size=20)
    assert measured.size == 20
    assert measured.defect_recall == 1.0 and measured.false_reject_rate == 1.0
