"""`linesight demo --workdir DIR` wipes DIR at start. It does so only for a folder a demo
made, says so, and refuses any other folder that holds something (a typo such as
`--workdir .` or `--workdir ~` must not delete a project or a home folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linesight import demo
from linesight.cli import main


@pytest.fixture
def no_line(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The demo up to the point where it would start the line; gives the workdirs it got."""
    started: list[Path] = []

    def run(line: demo.Line, args: argparse.Namespace, version: str) -> int:
        started.append(line.workdir)
        return 0

    monkeypatch.setattr(demo, "_run", run)
    return started


def test_a_folder_with_other_files_is_refused_and_kept(
    tmp_path: Path, no_line: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert no_line == []
    err = capsys.readouterr().err
    assert f"linesight demo: error: --workdir {tmp_path} holds files" in err


def test_a_file_is_refused(
    tmp_path: Path, no_line: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    assert main(["demo", "--workdir", str(target)]) == 2
    assert target.read_text() == "keep"
    assert f"--workdir {target} is not a folder" in capsys.readouterr().err


def test_a_previous_demos_folder_is_wiped_and_that_is_said(
    tmp_path: Path, no_line: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir)]) == 0  # a new folder: nothing to say
    assert "removing" not in capsys.readouterr().out
    (workdir / "logs").mkdir()
    (workdir / "logs" / "controller.log").write_text("old run")
    assert main(["demo", "--workdir", str(workdir)]) == 0
    assert no_line == [workdir, workdir]
    assert not (workdir / "logs").exists()
    assert f"removing the previous demo's data in {workdir}" in capsys.readouterr().out


def test_an_empty_folder_is_used(tmp_path: Path, no_line: list[Path]) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    assert main(["demo", "--workdir", str(workdir)]) == 0
    assert no_line == [workdir]


def test_a_folder_of_a_demo_from_before_the_marker_is_still_recognised(
    tmp_path: Path, no_line: list[Path]
) -> None:
    """Demos before this version left processes.json and logs/ but no marker."""
    (tmp_path / "processes.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    assert no_line == [tmp_path]
