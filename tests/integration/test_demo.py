"""`linesight demo` end to end: the line comes up, the regressed model is rolled back, and
nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_rolls_back_a_regressed_model_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "linesight.cli", "demo", "--scenario", "regressed",
         "--exit-when-done", "--workdir", str(workdir), "--rate", "15",
         "--operator-delay", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fleet dashboard" in result.stdout and "press-03" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-2])["summary"]
    assert summary["outcome"] == "rolled_back"
    assert summary["parts_decided_by_candidate"] == 0
    assert summary["escaped_defects"]["candidate"] == 0
    pids = json.loads((workdir / "processes.json").read_text())
    assert set(pids) >= {"controller", "mosquitto", "agent-press-01", "ui-press-03"}
    assert not [name for name, pid in pids.items() if alive(pid)], "processes left behind"
