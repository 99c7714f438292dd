"""Where the demo and the simulation find their models, and what they say when they cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from linesight.cli import main
from linesight.demo_models import CHECKOUT_MODELS, models_dir, require_bundle
from tests.support import V21

pytestmark = pytest.mark.unit


def test_a_checkout_uses_its_own_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINESIGHT_MODELS", raising=False)
    assert models_dir() == CHECKOUT_MODELS


def test_linesight_models_names_another_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LINESIGHT_MODELS", str(tmp_path))
    assert models_dir() == tmp_path


def test_a_missing_bundle_says_where_models_are_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LINESIGHT_MODELS"):
        require_bundle(tmp_path / "part-classifier" / "1.0.0")


def test_sim_without_its_active_bundle_exits_2_with_that_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--candidate", str(V21), "--active", str(tmp_path / "none")]) == 2
    assert "set LINESIGHT_MODELS" in capsys.readouterr().err
