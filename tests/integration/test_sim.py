"""`linesight sim`: the headless line ends with one JSON line, and a seed fixes the outcome."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import V2, V21


def sim(candidate: str, seed: int) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "linesight.cli", "--log-level", "WARNING", "sim",
         "--stations", "3", "--candidate", candidate, "--seed", str(seed), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    summary: dict[str, object] = json.loads(lines[0])
    assert set(summary) == {
        "outcome", "stages_passed", "parts", "parts_decided_by_candidate", "escaped_defects",
        "false_rejects", "labels_used", "seconds_to_decision",
    }
    return summary


def test_the_regressed_model_is_rolled_back_the_same_way_for_the_same_seed() -> None:
    first, second = sim(str(V21), 5), sim(str(V21), 5)
    for summary in (first, second):
        assert summary["outcome"] == "rolled_back"
        assert summary["parts_decided_by_candidate"] == 0
        assert summary["escaped_defects"]["candidate"] == 0  # type: ignore[index]
    assert first["stages_passed"] == second["stages_passed"] == 0


def test_the_better_model_is_promoted() -> None:
    summary = sim(str(V2), 5)
    assert summary["outcome"] == "promoted" and summary["stages_passed"] == 4
    assert isinstance(summary["labels_used"], int) and summary["labels_used"] > 0
