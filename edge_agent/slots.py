"""The models a station runs: ACTIVE, an optional CANDIDATE, and the PREVIOUS active kept for
rollback. Loading always goes through bundle verification first; the slot changes themselves
(promote, rollback, switch) are small pure functions on an immutable `Slots` value, applied by the
agent at a part boundary."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.inference import InferenceError, ModelSession, Prediction
from edge_agent.policy import Slot
from linesight.artifacts import (
    MANIFEST_FILE,
    BundleError,
    Manifest,
    sha256_file,
    verify_bundle,
)
from linesight.protocol import DeploymentMode, ModelRef

log = logging.getLogger(__name__)


class SlotError(Exception):
    """A slot change that is not allowed now; the message says why."""


class Predictor(Protocol):
    def predict(self, frame_bgr: np.ndarray) -> Prediction: ...


@dataclass(frozen=True, slots=True)
class LoadedModel:
    bundle: Path
    manifest: Manifest
    ref: ModelRef
    session: Predictor


@dataclass(frozen=True, slots=True)
class UnloadableSession:
    """Stands in for a model that failed to load: every part it sees goes to fail-safe review."""

    reason: str

    def predict(self, frame_bgr: np.ndarray) -> Prediction:
        raise InferenceError(f"model not loaded: {self.reason}")


UNLOADED_REF = ModelRef(name="unloaded", version="0.0.0", sha256="0" * 64)


def unloadable_model(bundle: Path, reason: str) -> LoadedModel:
    """A placeholder ACTIVE model, so a station whose model cannot load keeps running, holds
    every part for review and reports the fault, instead of stopping the line's records."""
    manifest = Manifest.model_validate({
        "name": "unloaded", "version": "0.0.0", "description": reason[:500],
        "input": {"name": "none", "layout": "NCHW", "height": 1, "width": 1, "colour": "bgr",
                  "dtype": "uint8"},
        "output": {"name": "none"}, "labels": ["ok", "defect"], "defect_label": "defect",
        "thresholds": {}, "files": {"model.onnx": {"sha256": "0" * 64, "size": 0}},
        "created": "1970-01-01T00:00:00Z",
    })
    return LoadedModel(bundle, manifest, UNLOADED_REF, UnloadableSession(reason))


def is_placeholder(model: LoadedModel) -> bool:
    """True for the stand-in `unloadable_model` gives: not a model to go back to."""
    return isinstance(model.session, UnloadableSession)


def load_model(
    bundle: Path,
    key: Ed25519PublicKey | None,
    *,
    providers: Sequence[str],
    threads: int,
) -> LoadedModel:
    """Verify (digests, and the signature when a key is configured), then open and warm up."""
    manifest = verify_bundle(bundle, key)
    ref = ModelRef(
        name=manifest.name, version=manifest.version, sha256=sha256_file(bundle / MANIFEST_FILE)
    )
    session = ModelSession(bundle, manifest, providers=providers, intra_op_threads=threads)
    log.info("loaded %s %s from %s (%s)", ref.name, ref.version, bundle, session.providers)
    return LoadedModel(bundle, manifest, ref, session)


@dataclass(frozen=True, slots=True)
class Slots:
    active: LoadedModel
    candidate: LoadedModel | None = None
    previous: LoadedModel | None = None
    mode: DeploymentMode = DeploymentMode.NONE
    canary_fraction: float = 0.0
    serving: Slot = "active"

    def model(self, slot: Slot) -> LoadedModel:
        if slot == "candidate":
            if self.candidate is None:
                raise SlotError("no candidate is loaded")
            return self.candidate
        return self.active

    def to_record(self) -> dict[str, Any]:
        """What survives a restart: bundle folders and the mode."""
        return {
            "active": str(self.active.bundle),
            "candidate": str(self.candidate.bundle) if self.candidate else None,
            "previous": str(self.previous.bundle) if self.previous else None,
            "mode": self.mode.value,
            "canary_fraction": self.canary_fraction,
            "serving": self.serving,
        }


def with_candidate(
    slots: Slots, candidate: LoadedModel, mode: DeploymentMode, canary_fraction: float
) -> Slots:
    """Stage a new candidate. A version not newer than the active one is refused: going back is
    the explicit rollback command's job, never a deploy's. The mode is checked as `with_mode`
    checks it (canary needs a fraction in (0, 1]), so what is accepted now is restored after a
    restart."""
    if candidate.manifest.name != slots.active.manifest.name:
        log.info(
            "candidate %s replaces model family %s", candidate.manifest.name,
            slots.active.manifest.name,
        )
    elif candidate.manifest.version_tuple <= slots.active.manifest.version_tuple:
        raise SlotError(
            f"candidate {candidate.ref.version} is not newer than active "
            f"{slots.active.ref.version}; use rollback to go back"
        )
    if mode == DeploymentMode.NONE:
        mode = DeploymentMode.SHADOW
    return with_mode(replace(slots, candidate=candidate, serving="active"), mode, canary_fraction)


def check_fraction(mode: DeploymentMode, canary_fraction: float) -> None:
    """A canary needs a fraction in (0, 1]: checked before a deploy downloads anything."""
    if mode == DeploymentMode.CANARY and not 0 < canary_fraction <= 1:
        raise SlotError("canary needs a fraction in (0, 1]")


def with_mode(slots: Slots, mode: DeploymentMode, canary_fraction: float) -> Slots:
    if mode != DeploymentMode.NONE and slots.candidate is None:
        raise SlotError(f"mode {mode.value!r} needs a candidate, and none is loaded")
    check_fraction(mode, canary_fraction)
    serving: Slot = slots.serving if mode == DeploymentMode.BLUE_GREEN else "active"
    return replace(slots, mode=mode, canary_fraction=canary_fraction, serving=serving)


def promoted(slots: Slots, expect: ModelRef | None) -> Slots:
    """The candidate becomes active; the old active is kept as previous for rollback, unless it
    was the placeholder of a model that could not load (there is nothing to go back to)."""
    if slots.candidate is None:
        raise SlotError("nothing to promote: no candidate is loaded")
    if expect is not None and expect.sha256 != slots.candidate.ref.sha256:
        raise SlotError(
            f"promote expected {expect.name} {expect.version}, the candidate is "
            f"{slots.candidate.ref.name} {slots.candidate.ref.version}"
        )
    previous = None if is_placeholder(slots.active) else slots.active
    return Slots(active=slots.candidate, previous=previous)


def rolled_back(slots: Slots) -> Slots:
    """Back to the model that ran before, at once: drop a candidate under trial, or undo the last
    promotion when no candidate is loaded."""
    if slots.candidate is not None:
        return Slots(active=slots.active, previous=slots.previous)
    if slots.previous is not None:
        return Slots(active=slots.previous)
    raise SlotError("nothing to roll back to: no candidate and no previous model")


def switched(slots: Slots, to: Slot) -> Slots:
    if slots.mode != DeploymentMode.BLUE_GREEN:
        raise SlotError("switch needs mode blue_green")
    if to == "candidate" and slots.candidate is None:
        raise SlotError("no candidate to switch to")
    return replace(slots, serving=to)


SavedSlot = Literal["active", "candidate", "previous"]


@dataclass(frozen=True, slots=True)
class RestoreProblem:
    """Part of a saved slot record that could not be brought back, and why."""

    slot: SavedSlot | Literal["mode"]
    message: str


def restore_slots(
    record: Mapping[str, Any],
    load: Callable[[Path, Slot], LoadedModel],
    fallback_active: Callable[[], LoadedModel],
) -> tuple[Slots, list[RestoreProblem]]:
    """The slots a `Slots.to_record()` saved, each bundle restored on its own: one that no longer
    loads costs only its own slot (an active one is replaced by `fallback_active()`), and a mode
    that is no longer allowed puts the candidate in shadow. What was lost is in the problems."""
    problems: list[RestoreProblem] = []

    def restore(saved: SavedSlot) -> LoadedModel | None:
        bundle = record.get(saved)
        if not bundle:
            return None
        try:
            return load(Path(bundle), "candidate" if saved == "candidate" else "active")
        except (BundleError, InferenceError, OSError) as exc:
            problems.append(
                RestoreProblem(saved, f"saved {saved} model {bundle} not restored: {exc}")
            )
            return None

    active = restore("active") or fallback_active()
    candidate = restore("candidate")
    previous = restore("previous")
    if previous is not None and previous.ref == active.ref:
        previous = None  # the fallback is the model kept for rollback: nothing to go back to
    slots = Slots(active=active, candidate=candidate, previous=previous)
    if slots.candidate is None:
        return slots, problems
    try:
        mode = DeploymentMode(record.get("mode", DeploymentMode.SHADOW.value))
        slots = with_mode(slots, mode, float(record.get("canary_fraction", 0.0)))
        if record.get("serving") == "candidate" and slots.mode == DeploymentMode.BLUE_GREEN:
            slots = switched(slots, "candidate")
    except (SlotError, ValueError, TypeError) as exc:
        problems.append(RestoreProblem(
            "mode", f"saved mode {record.get('mode')!r} (canary fraction "
            f"{record.get('canary_fraction')!r}) not restored: {exc}; the candidate runs in shadow",
        ))
        slots = with_mode(slots, DeploymentMode.SHADOW, 0.0)
    return slots, problems
