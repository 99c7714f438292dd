"""`linesight ui` names the flag a user typed when its value is refused, and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from linesight.cli import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("flag", "said"), [
    (["--shift-start", "24"], "--shift-start: 0 to 23"),
    (["--shift-hours", "5"], "--shift-hours: must divide 24"),
    (["--idle-timeout", "nan"], "--idle-timeout: must be a number of seconds > 0"),
    (["--idle-timeout", "0"], "--idle-timeout: must be a number of seconds > 0"),
    (["--outbox-warn", "0"], "--outbox-warn: must be at least 1"),
])
def test_a_refused_value_names_its_flag(
    tmp_path: Path, flag: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ui", "--data-dir", str(tmp_path), "--port", "18999", *flag]) == 2
    assert said in capsys.readouterr().err
