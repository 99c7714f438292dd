"""Slot changes and their restore after a restart: what is accepted now must come back, and one
lost bundle costs only its own slot. Models are the shipped manifests with a stand-in session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.inference import Prediction
from edge_agent.policy import Slot
from edge_agent.slots import (
    LoadedModel,
    SlotError,
    Slots,
    promoted,
    restore_slots,
    rolled_back,
    unloadable_model,
    with_candidate,
)
from linesight.artifacts import MANIFEST_FILE, BundleError, parse_manifest, sha256_file
from linesight.protocol import DeploymentMode, ModelRef
from tests.support import MODELS, V1, V2, V21


class NoSession:
    def predict(self, frame_bgr: np.ndarray) -> Prediction:
        raise AssertionError("not used")


def model(bundle: Path) -> LoadedModel:
    manifest = parse_manifest((bundle / MANIFEST_FILE).read_bytes())
    ref = ModelRef(name=manifest.name, version=manifest.version,
                   sha256=sha256_file(bundle / MANIFEST_FILE))
    return LoadedModel(bundle, manifest, ref, NoSession())


def loader(missing: set[Path]) -> Any:
    """Loads the shipped bundles by path, like the agent; BundleError for those in `missing`."""
    def load(bundle: Path, slot: Slot) -> LoadedModel:
        if bundle in missing:
            raise BundleError("layout", f"{bundle} is not a folder")
        return model(bundle)
    return load


def configured() -> LoadedModel:
    return model(V1)


# --- deploy: a mode refused at restart is refused at once --------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_canary_deploy_without_a_valid_fraction_is_refused(fraction: float) -> None:
    slots = Slots(active=model(V1))
    with pytest.raises(SlotError, match="canary needs a fraction"):
        with_candidate(slots, model(V2), DeploymentMode.CANARY, fraction)


# --- promotion on a station whose configured model could not load -----------------------------


def test_a_placeholder_is_never_kept_as_previous() -> None:
    placeholder = unloadable_model(Path("/nowhere/bundle"), "not a folder")
    slots = with_candidate(Slots(active=placeholder), model(V1), DeploymentMode.SHADOW, 0.0)
    after = promoted(slots, None)
    assert after.active.ref.version == "1.0.0"
    assert after.previous is None and after.to_record()["previous"] is None
    with pytest.raises(SlotError, match="nothing to roll back to"):
        rolled_back(after)


# --- restore, slot by slot ----------------------------------------------------------------------


def saved(**changes: Any) -> dict[str, Any]:
    record = Slots(active=model(V2), candidate=model(V21), previous=model(V1),
                   mode=DeploymentMode.SHADOW).to_record()
    record["automation"] = "partial"
    record.update(changes)
    return record


def test_a_lost_previous_bundle_costs_only_the_previous_slot() -> None:
    restored, problems = restore_slots(saved(), loader({V1}), configured)
    assert restored.active.ref.version == "2.0.0"
    assert restored.candidate is not None and restored.candidate.ref.version == "2.1.0"
    assert restored.mode == DeploymentMode.SHADOW and restored.previous is None
    assert [p.slot for p in problems] == ["previous"] and str(V1) in problems[0].message


def test_a_lost_candidate_costs_only_the_candidate_slot() -> None:
    restored, problems = restore_slots(saved(mode="canary", canary_fraction=0.5), loader({V21}),
                                       configured)
    assert restored.active.ref.version == "2.0.0" and restored.candidate is None
    assert restored.previous is not None and restored.previous.ref.version == "1.0.0"
    assert restored.mode == DeploymentMode.NONE
    assert [p.slot for p in problems] == ["candidate"]


def test_a_lost_active_is_replaced_by_the_fallback_and_the_rest_kept() -> None:
    fallback = model(MODELS / "part-classifier-gray" / "1.0.0")
    restored, problems = restore_slots(saved(), loader({V2}), lambda: fallback)
    assert restored.active is fallback
    assert restored.candidate is not None and restored.previous is not None
    assert [p.slot for p in problems] == ["active"]


def test_a_saved_canary_without_a_fraction_keeps_its_models_in_shadow() -> None:
    # What a station saved before deploys were checked: canary at the protocol's default 0.0.
    restored, problems = restore_slots(saved(mode="canary", canary_fraction=0.0), loader(set()),
                                       configured)
    assert restored.active.ref.version == "2.0.0"
    assert restored.candidate is not None and restored.candidate.ref.version == "2.1.0"
    assert restored.previous is not None
    assert restored.mode == DeploymentMode.SHADOW
    assert [p.slot for p in problems] == ["mode"] and "canary" in problems[0].message
