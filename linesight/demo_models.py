"""Where the demo's and the simulation's model bundles are.

A source checkout has them in its `models/`; the ARM64 image copies them to
`/opt/linesight/models`; a wheel installed elsewhere has none (they are not packaged: the
folder also holds a private key). `$LINESIGHT_MODELS` names another folder."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT_MODELS = Path(__file__).resolve().parents[1] / "models"
IMAGE_MODELS = Path("/opt/linesight/models")


def models_dir() -> Path:
    """$LINESIGHT_MODELS, else the first of the checkout's and the image's folders that exists
    (the checkout's when neither does, so that errors name where they were looked for)."""
    named = os.environ.get("LINESIGHT_MODELS")
    if named:
        return Path(named)
    return next((path for path in (CHECKOUT_MODELS, IMAGE_MODELS) if path.is_dir()),
                CHECKOUT_MODELS)


def require_bundle(path: Path) -> Path:
    """`path` if it is a folder, else a ValueError that says where the models are looked for."""
    if not path.is_dir():
        raise ValueError(
            f"no model bundle at {path}: the demo models come with a source checkout (models/) "
            f"or the image ({IMAGE_MODELS}); set LINESIGHT_MODELS to the folder that holds them"
        )
    return path
