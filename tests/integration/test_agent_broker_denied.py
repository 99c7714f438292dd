"""A broker that takes the station's connection but not its messages (its ACL is for another
user name: press-02 configured with press-01's credentials): the station says so with a fault
on its own screen instead of only piling messages up, and clears it once the broker takes them.
A real Mosquitto with the ACL of docs/deploy.md."""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import threading
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight.broker import start_broker, write_password_file
from tests.support import REPO, station_config, wait_for


def deploy_guide_acl() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    (block,) = re.findall(r"```conf\n(# /etc/mosquitto/linesight.acl\n.*?)```", text, re.S)
    return block


def test_messages_the_broker_refuses_are_a_fault_until_it_takes_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password = secrets.token_urlsafe(16)
    passwd = write_password_file(tmp_path / "passwd", {"press-01": password})
    acl = tmp_path / "linesight.acl"
    acl.write_text(deploy_guide_acl())
    with start_broker(tmp_path / "broker", password_file=passwd, acl_file=acl) as broker:
        config = station_config(
            tmp_path / "station", broker.url, station="press-02",
            broker__username="press-01", broker__password=password, state_interval_s=0.5,
            broker__refused_retry_s=1.0, outbox__relay="thread", outbox__receipt_wait_s=0.2,
        )
        agent = Agent(config)
        finished = threading.Event()
        threading.Thread(target=lambda: (agent.run(), finished.set()), daemon=True).start()
        try:
            with caplog.at_level(logging.WARNING, logger="linesight.mqtt"):
                wait_for(lambda: "broker_denied" in agent.faults, 30, "the broker_denied fault")
                message = agent.faults["broker_denied"].message
                assert message.startswith("the broker refuses to take messages on "
                                          "linesight/v1/stations/press-02/"), message
                assert "Not authorized" in message and "ACL" in message, message
                # Mosquitto closes the connection after a refused publish: that is no other
                # client with this client id, and the station keeps inspecting meanwhile.
                inspected = agent.parts_inspected
                wait_for(lambda: broker.log_path.read_text().count("New client connected") >= 4,
                         30, "the station to connect again after three refusals")
                assert agent.parts_inspected > inspected
                assert agent.store.outbox_depth() > 0
                assert "client_id_conflict" not in agent.faults
                assert "broker_refused" not in agent.faults
            logged = [r.getMessage() for r in caplog.records]
            refusals = [line for line in logged if "refuses to take messages on" in line]
            assert refusals and len(refusals) == len(set(refusals)), "once a topic"
            assert not [line for line in logged if "uses client id" in line], logged

            # The broker's ACL now lets this user write the station's topics.
            acl.write_text(deploy_guide_acl() + "\nuser press-01\n"
                           "topic write linesight/v1/stations/press-02/#\n")
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)  # mosquitto reloads its ACL file
            wait_for(lambda: "broker_denied" not in agent.faults, 30, "the fault to clear")
        finally:
            agent.stop()
            assert finished.wait(30)
