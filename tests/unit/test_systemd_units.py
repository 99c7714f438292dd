"""The shipped systemd units parse without a warning (`systemd-analyze verify`, with the
venv's `linesight` replaced by an executable that exists here), and each starts a command line
that `linesight` takes."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from linesight.cli import build_parser

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
LINESIGHT = "/opt/linesight/venv/bin/linesight"

NO_SYSTEMD = shutil.which("systemd-analyze") is None


@pytest.mark.skipif(NO_SYSTEMD, reason="needs systemd-analyze (package systemd)")
def test_every_unit_parses_without_a_warning(tmp_path: Path) -> None:
    units = sorted([*UNITS.glob("*.service"), *UNITS.glob("*.timer")])
    assert {unit.name for unit in units} >= {
        "linesight-agent.service", "linesight-ui.service", "linesight-controller.service",
        "linesight-fleet-backup.service", "linesight-fleet-backup.timer"}
    for unit in units:
        text = unit.read_text()
        assert unit.suffix == ".timer" or LINESIGHT in text, unit
        (tmp_path / unit.name).write_text(text.replace(LINESIGHT, "/bin/true"))
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in units)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


@pytest.mark.parametrize("unit", sorted(UNITS.glob("*.service")), ids=lambda unit: unit.name)
def test_each_unit_starts_a_command_line_linesight_takes(unit: Path) -> None:
    lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    program, *args = shlex.split(lines[0].removeprefix("ExecStart="))
    assert program == LINESIGHT
    parsed = build_parser().parse_args(args)  # exits (a test failure) on a flag it lacks
    assert callable(parsed.handler)
