"""`linesight demo` refuses a mistake in its arguments with exit status 2, before it starts a
line (which it would otherwise start and then leave running)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linesight import demo
from linesight.cli import main


@pytest.fixture
def no_line(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    started: list[Path] = []

    def run(line: demo.Line, args: argparse.Namespace, version: str) -> int:
        started.append(line.workdir)
        return 0

    monkeypatch.setattr(demo, "_run", run)
    return started


@pytest.mark.parametrize(("argument", "said"), [
    (["--timeout", "-1"], "--timeout must be a number of seconds > 0"),
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0"),
    (["--timeout", "0"], "--timeout must be a number of seconds > 0"),
    (["--operator-delay", "-4"], "--operator-delay must be a number of seconds >= 0"),
    (["--operator-delay", "nan"], "--operator-delay must be a number of seconds >= 0"),
    (["--operator-delay", "inf"], "--operator-delay must be a number of seconds >= 0"),
])
def test_a_bad_argument_exits_2_naming_it_and_starts_nothing(
    argument: list[str], said: str, tmp_path: Path, no_line: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--workdir", str(tmp_path / "demo"), *argument]) == 2
    assert f"linesight demo: error: {said}" in capsys.readouterr().err
    assert no_line == []
    assert not (tmp_path / "demo").exists()


def test_good_arguments_start_the_line(tmp_path: Path, no_line: list[Path]) -> None:
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--timeout", "inf",
                 "--operator-delay", "0"]) == 0
    assert no_line == [tmp_path / "demo"]
