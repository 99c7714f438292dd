"""`linesight sim`: the headless line ends with one JSON line, and a seed fixes the outcome."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, V2, V21, wait_for


def sim(candidate: str, seed: int, *options: str, status: int = 0) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "linesight.cli", "--log-level", "WARNING", "sim",
         "--stations", "3", "--candidate", candidate, "--seed", str(seed), "--json", *options],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    summary: dict[str, object] = json.loads(lines[0])
    assert set(summary) == {
        "outcome", "phase", "stages_passed", "parts", "parts_decided_by_candidate",
        "escaped_defects", "false_rejects", "labels_used", "seconds_to_decision",
    }
    return summary


def test_the_regressed_model_is_rolled_back_the_same_way_for_the_same_seed() -> None:
    first, second = sim(str(V21), 5), sim(str(V21), 5)
    for summary in (first, second):
        assert summary["outcome"] == summary["phase"] == "rolled_back"
        assert summary["parts_decided_by_candidate"] == 0
        assert summary["escaped_defects"]["candidate"] == 0  # type: ignore[index]
    assert first["stages_passed"] == second["stages_passed"] == 0


def test_the_better_model_is_promoted() -> None:
    summary = sim(str(V2), 5)
    assert summary["outcome"] == "promoted" and summary["stages_passed"] == 4
    assert isinstance(summary["labels_used"], int) and summary["labels_used"] > 0


def test_a_rollout_waiting_for_approval_ends_the_run_without_a_decision() -> None:
    # Nobody can approve on a simulated line: the run ends there (well before --timeout), says
    # so, and exits 3.
    plan = REPO / "deploy" / "plans" / "approval-gated.yaml"
    summary = sim(str(V2), 5, "--plan", str(plan), "--timeout", "200", status=3)
    assert summary["outcome"] == summary["phase"] == "waiting_approval"
    assert summary["stages_passed"] == 1
    assert summary["seconds_to_decision"] is None


def test_a_rollout_still_running_at_the_timeout_is_reported_as_timed_out() -> None:
    summary = sim(str(V2), 5, "--timeout", "1", status=4)
    assert summary["outcome"] == "timed_out"
    assert summary["phase"] == "running"
    assert summary["seconds_to_decision"] is None


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_sigterm_stops_the_simulation_and_its_broker(tmp_path: Path) -> None:
    # The simulation's folder (and its broker's config in it) lands in TMPDIR: here, tmp_path.
    process = subprocess.Popen(
        [sys.executable, "-m", "linesight.cli", "sim", "--stations", "1", "--candidate",
         str(V2), "--seed", "4", "--timeout", "300"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("rollout of"):
                break
        assert _processes_mentioning(str(tmp_path)), "the simulation's broker is not running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    wait_for(lambda: not _processes_mentioning(str(tmp_path)), 10, "the broker to be gone")
    assert not list(tmp_path.glob("linesight-sim-*")), "the simulation's folder was left behind"


def test_a_candidate_outside_a_name_version_folder_is_the_one_rolled_out(tmp_path: Path) -> None:
    # The controller serves bundles as <root>/<name>/<version>: a candidate kept elsewhere (a
    # retrained model in its own folder) must be rolled out itself, not whatever bundle of that
    # name and version sits two folders up. Here that one is damaged.
    candidate = tmp_path / "work" / "retrained"
    shutil.copytree(V21, candidate)
    decoy = tmp_path / "part-classifier" / "2.1.0"
    shutil.copytree(V21, decoy)
    (decoy / "model.onnx").write_bytes(b"not the model")
    summary = sim(str(candidate), 5)
    assert summary["outcome"] == summary["phase"] == "rolled_back"
    assert summary["parts_decided_by_candidate"] == 0
    assert summary["stages_passed"] == 0
