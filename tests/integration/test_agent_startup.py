"""Start-up problems that are settings: a clean message naming the key, no traceback."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight.cli import main
from tests.support import V1, station_config


def test_a_metrics_port_in_use_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - where the agent serves its metrics
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["agent", "--station", "press-03", "--broker", "mqtt://127.0.0.1:1",
                     "--source", "synthetic:", "--active", str(V1), "--data-dir",
                     str(tmp_path), "--max-parts", "1", "--metrics-port", str(port),
                     "--set", "outbox.relay=thread"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "metrics_port" in err and str(port) in err, err


def test_a_configured_candidate_that_cannot_be_read_costs_only_its_slot(tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from tests.support import station_config

    unreadable = tmp_path / "candidate"
    unreadable.mkdir()
    # A manifest whose read fails with an I/O error (a failing disk, say).
    (unreadable / "manifest.json").symlink_to("/proc/self/mem")
    agent = Agent(station_config(tmp_path / "s", "mqtt://127.0.0.1:1", candidate=unreadable,
                                 mode="shadow", outbox__relay="thread"))
    try:
        assert agent.slots.candidate is None
        assert agent.slots.active.ref.version == "1.0.0"
        assert "candidate_load" in agent.faults
    finally:
        agent.writer.close()
        agent.gate.close()
        agent.source.close()
        agent.store.close()


def test_a_threshold_for_a_label_the_model_lacks_is_named_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", outbox__relay="thread",
                            thresholds={"okk": 0.99, "ok": 0.9})
    with caplog.at_level(logging.WARNING):
        agent = Agent(config)
    try:
        assert "thresholds for okk are not used" in caplog.text
        assert "its labels: ok, defect" in caplog.text
    finally:
        agent.writer.close()
        agent.gate.close()
        agent.source.close()
        agent.store.close()
