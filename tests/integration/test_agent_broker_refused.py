"""A broker that refuses the station's credentials: the station says so with a fault on its own
screen and keeps inspecting; once the broker takes them, the fault clears with no restart."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from pathlib import Path

from edge_agent.agent import Agent
from linesight.broker import start_broker, write_password_file
from tests.support import station_config, wait_for


def test_refused_credentials_are_a_fault_until_the_broker_takes_them(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(16)
    password_file = write_password_file(tmp_path / "passwd", {"someone-else": password})
    with start_broker(tmp_path / "broker", password_file=password_file) as broker:
        config = station_config(
            tmp_path / "station", broker.url, broker__username="press-01",
            broker__password=password, broker__refused_retry_s=1.0,
            outbox__relay="thread", outbox__receipt_wait_s=0.2,
        )
        agent = Agent(config)
        finished = threading.Event()
        threading.Thread(target=lambda: (agent.run(), finished.set()), daemon=True).start()
        try:
            wait_for(lambda: "broker_refused" in agent.faults, 30, "the broker_refused fault")
            assert "not authorised" in agent.faults["broker_refused"].message or \
                "bad user name or password" in agent.faults["broker_refused"].message
            inspected = agent.parts_inspected
            wait_for(lambda: agent.parts_inspected > inspected + 5, 30, "inspection going on")
            write_password_file(tmp_path / "passwd", {"press-01": password})
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads its password file
            wait_for(lambda: "broker_refused" not in agent.faults, 30, "the fault to clear")
            wait_for(lambda: agent.link.connected, 10, "the station connected")
        finally:
            agent.stop()
            assert finished.wait(30)
