"""The systemd drop-ins docs/deploy.md gives (the Jetson GPU settings, the backup's folder on a
network share) parse with the shipped units, and the backup's still writes where it points:
the unit's file system is read-only (ProtectSystem=strict) but for the folders it names."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
LINESIGHT = "/opt/linesight/venv/bin/linesight"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


def _ini_blocks() -> list[str]:
    text = (REPO / "docs" / "deploy.md").read_text()
    return [textwrap.dedent(block) for _, kind, block in FENCE.findall(text) if kind == "ini"]


def _settings(text: str, name: str) -> list[str]:
    """Every value of `name=` in a unit or drop-in, an empty assignment resetting the list."""
    values: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"{name}="):
            value = line.removeprefix(f"{name}=").strip()
            values = [*values, *value.split()] if value else []
    return values


def _backup_drop_in() -> str:
    blocks = [block for block in _ini_blocks() if "fleet backup" in block]
    assert blocks, "deploy.md shows no drop-in for the backup's folder"
    (block,) = blocks
    return block


def test_the_backup_drop_in_may_write_the_folder_it_backs_up_to() -> None:
    unit = (UNITS / "linesight-fleet-backup.service").read_text()
    drop_in = _backup_drop_in()
    reset, exec_start = [line for line in drop_in.splitlines() if line.startswith("ExecStart=")]
    assert reset == "ExecStart=", "a oneshot's ExecStart= adds a command unless reset first"
    program, *args = shlex.split(exec_start.removeprefix("ExecStart="))
    assert program == LINESIGHT and args[:2] == ["fleet", "backup"]
    dest = Path(args[2])
    writable = [Path(path.lstrip("-")) for path in _settings(unit + drop_in, "ReadWritePaths")]
    writable += [Path("/var/lib") / name for name in _settings(unit, "StateDirectory")]
    assert any(dest == folder or folder in dest.parents for folder in writable), (
        f"{dest} is read-only under ProtectSystem=strict; writable: {writable}")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="needs systemd-analyze (package systemd)")
@pytest.mark.parametrize("unit", ["linesight-agent.service", "linesight-fleet-backup.service"])
def test_the_drop_ins_the_page_shows_parse_with_the_units(tmp_path: Path, unit: str) -> None:
    marker = {"linesight-agent.service": "DeviceAllow=",
              "linesight-fleet-backup.service": "fleet backup"}[unit]
    drop_ins = [block for block in _ini_blocks() if marker in block]
    assert drop_ins, f"deploy.md shows no drop-in for {unit}"
    (tmp_path / unit).write_text((UNITS / unit).read_text().replace(LINESIGHT, "/bin/true"))
    folder = tmp_path / f"{unit}.d"
    folder.mkdir()
    for number, block in enumerate(drop_ins):
        (folder / f"{number}.conf").write_text(block.replace(LINESIGHT, "/bin/true"))
    done = subprocess.run(
        ["systemd-analyze", "verify", unit],  # noqa: S607 - found on PATH, as an admin runs it
        cwd=tmp_path, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")
