"""What the user typed that cannot work, and failures while running: one line on stderr, no
traceback, exit status 2 for the former and 1 for the demo's line failing under it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linesight import demo
from linesight.cli import main


def test_a_plan_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(b"name: \xff\n")
    status = main(["fleet", "rollout", "start", str(plan), "--candidate", "p:1.0.0",
                   "--controller", "http://127.0.0.1:9"])
    assert status == 2
    assert f"linesight fleet: error: plan {plan} is not UTF-8 text" in capsys.readouterr().err


def test_a_piece_of_the_demo_line_that_dies_ends_it_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def dies(line: demo.Line, args: argparse.Namespace, version: str) -> int:
        raise demo.LineFailed("controller exited with status 1; see demo/logs/controller.log")

    monkeypatch.setattr(demo, "_run", dies)
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 1
    captured = capsys.readouterr()
    assert ("linesight demo: error: controller exited with status 1; see "
            "demo/logs/controller.log") in captured.err
    assert "stopped; data and logs are in" in captured.out


@pytest.mark.parametrize("rate", ["0", "-1", "nan", "inf", "20000"])
def test_a_rate_no_station_takes_is_refused_before_the_line_starts(
    rate: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[str] = []

    def run(*args: object) -> int:
        started.append("line")
        return 0

    monkeypatch.setattr(demo, "_run", run)
    assert main(["demo", "--rate", rate, "--workdir", str(tmp_path / "demo")]) == 2
    assert started == []
    assert "linesight demo: error: --rate must be a number of parts per second" in (
        capsys.readouterr().err)



# waitress leaves the socket it could not bind unclosed; the process ends right after.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fleet_serve_on_a_port_in_use_names_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gc
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["fleet", "serve", "--broker", "mqtt://127.0.0.1:1",
                       "--data-dir", str(tmp_path / "fleet"), "--bundles", "models",
                       "--http-port", str(port)])
        gc.collect()  # the leaked socket's warning lands here, where it is ignored
    assert status == 2
    assert (f"linesight fleet: error: cannot serve the API on 127.0.0.1:{port}: "
            "Address already in use") in capsys.readouterr().err


DAMAGED = b"not a database: what a power cut can leave of one " * 20


def test_an_agent_whose_store_is_damaged_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "station"
    data_dir.mkdir()
    (data_dir / "station.db").write_bytes(DAMAGED)
    status = main(["agent", "--station", "s1", "--broker", "mqtt://127.0.0.1:1",
                   "--source", "synthetic:seed=1", "--active", "models/part-classifier/1.0.0",
                   "--data-dir", str(data_dir)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"linesight agent: error: {data_dir / 'station.db'}: file is not a database" in err


def test_a_controller_whose_store_is_damaged_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "fleet"
    data_dir.mkdir()
    (data_dir / "fleet.db").write_bytes(DAMAGED)
    status = main(["fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--data-dir",
                   str(data_dir), "--bundles", "models", "--http-port", "0"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"linesight fleet: error: {data_dir / 'fleet.db'}: file is not a database" in err
