"""A camera's password never leaves the station: not in its faults (published in its state),
its log or its systemd status. Real agent and bundle; a camera address nothing answers on."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight.broker import free_port
from tests.support import station_config, wait_for


def test_a_camera_password_is_masked_in_faults_log_and_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = f"http://admin:s3cret@127.0.0.1:{free_port()}/video.mjpg"
    config = station_config(
        tmp_path, "mqtt://127.0.0.1:1", source=source,
        source_options={"stale_after_s": 0.5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.2},
        outbox__relay="thread", outbox__receipt_wait_s=0.2,
    )
    caplog.set_level(logging.INFO)
    agent = Agent(config)
    finished = threading.Event()
    threading.Thread(target=lambda: (agent.run(), finished.set()), daemon=True).start()
    try:
        wait_for(lambda: "source" in agent.faults, 30, "the source fault")
        message = agent.faults["source"].message
        assert "s3cret" not in message and "admin:***@" in message
        assert "s3cret" not in agent._ready_status()
    finally:
        agent.stop()
        assert finished.wait(30)
    assert "inspecting from http://admin:***@" in caplog.text
    assert "s3cret" not in caplog.text
