"""`linesight demo` end to end: the line comes up, the regressed model is rolled back, and
nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.store import StationStore


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


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [
        (signal.SIGINT, 130, "stopping the line"),  # what Ctrl-C in the terminal sends
        (signal.SIGTERM, 143, "SIGTERM: stopping the line"),  # kill, a service manager
    ],
)
def test_a_stop_signal_stops_the_whole_line(
    tmp_path: Path, signum: signal.Signals, code: int, said: str
) -> None:
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "demo", "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "rollout r-" not in log.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "rollout r-" in log.read_text(), "the line did not come up"
        demo.send_signal(signum)
        assert demo.wait(120) == code
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert said in log.read_text()
    pids = json.loads((workdir / "processes.json").read_text())
    assert not [name for name, pid in pids.items() if alive(pid)], "processes left behind"
    # The stations' data stays, and the stations stopped before the controller: everything
    # they sent on their way out was receipted, so every decision is in the fleet store.
    assert (workdir / "fleet" / "fleet.db").exists()
    for station in ("press-01", "press-02", "press-03"):
        with StationStore(workdir / station) as store:
            assert store.outbox_depth() == 0, f"{station} still owes messages"
