"""A station warns before its disk is full: with less free space on the data dir's file system
than `storage.min_free_mb`, the disk_low fault is in its state, its screen's snapshot and its
metrics. Real agent on the shipped bundle, real mosquitto, the machine's real disk: the floors
are set far above and far below what this disk has free."""

from __future__ import annotations

import logging
import math
import re
import shutil
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import MAX_MIN_FREE_MB
from linesight import protocol as p
from linesight.broker import Broker, free_port
from linesight.disk_space import MB, size_text
from tests.support import Collector, agent_running, station_config, wait_for


@pytest.fixture
def collector(broker: Broker) -> Iterator[Collector]:
    c = Collector(broker.url)
    yield c
    c.close()


@contextmanager
def running(tmp_path: Path, broker: Broker, min_free_mb: float, port: int) -> Iterator[Agent]:
    config = station_config(
        tmp_path / "data", broker.url, source="synthetic:seed=11,rate=20", metrics_port=port,
        storage__min_free_mb=min_free_mb, state_interval_s=0.5,
        outbox__relay="thread", outbox__receipt_wait_s=0.2,
    )
    with agent_running(config) as agent:
        yield agent


def scrape(port: int) -> dict[str, float]:
    """The station's Prometheus samples, by name and labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def faults_in_state(collector: Collector) -> list[set[str]]:
    return [{fault.code for fault in state.faults}
            for state in collector.of(p.StationState, "press-01") if state.online]


def test_free_space_below_the_floor_raises_disk_low_with_the_space_in_words(
    tmp_path: Path, broker: Broker, collector: Collector
) -> None:
    port = free_port()
    with running(tmp_path, broker, MAX_MIN_FREE_MB, port) as agent:
        wait_for(lambda: "disk_low" in agent.faults, 30, "the disk_low fault")
        message = agent.faults["disk_low"].message
        data_dir = (tmp_path / "data").absolute()
        usage = shutil.disk_usage(data_dir)
        assert f"on the file system of {data_dir}," in message
        assert f" free of {size_text(usage.total)} " in message
        found = re.match(r"only ([\d.]+ [MGT]B) free of ", message)
        assert found, message
        assert "below the 954 TB floor (storage.min_free_mb: 1000000000)" in message

        # In the retained state the controller and the line see, and on the station's screen.
        wait_for(lambda: any("disk_low" in codes for codes in faults_in_state(collector)), 15,
                 "a StationState with disk_low")
        wait_for(lambda: "disk_low" in _status_codes(agent), 10, "the screen's snapshot")

        # In the metrics: the free bytes of the data dir's file system, and the fault.
        samples = scrape(port)
        free = samples['linesight_disk_free_bytes{station="press-01"}']
        assert 0 <= free <= usage.total
        assert abs(free - shutil.disk_usage(data_dir).free) < 1024 * MB
        assert samples['linesight_fault_events_total{code="disk_low",station="press-01"}'] == 1
        assert samples['linesight_faults{station="press-01"}'] >= 1

        # Back above the floor but within 10 % of it: still low, the message says where it is.
        agent.config.storage.min_free_mb = shutil.disk_usage(data_dir).free / MB / 1.05
        agent._check_disk_space()
        assert "disk_low" in agent.faults
        assert "storage.min_free_mb: 1000000000" not in agent.faults["disk_low"].message
        # Well above it: cleared, and counted once.
        agent.config.storage.min_free_mb = 1
        agent._check_disk_space()
        assert "disk_low" not in agent.faults
        wait_for(lambda: "disk_low" not in faults_in_state(collector)[-1], 15,
                 "a StationState without disk_low")
        assert scrape(port)[
            'linesight_fault_events_total{code="disk_low",station="press-01"}'] == 1


def test_free_space_above_the_floor_raises_nothing(
    tmp_path: Path, broker: Broker, collector: Collector
) -> None:
    port = free_port()
    with running(tmp_path, broker, 1, port) as agent:
        wait_for(lambda: agent.parts_inspected > 10, 30, "parts inspected")  # metrics served
        key = 'linesight_disk_free_bytes{station="press-01"}'
        wait_for(lambda: scrape(port)[key] > MB, 30, "the free space measured")
        wait_for(lambda: len(faults_in_state(collector)) >= 3, 15, "a few states")
        assert "disk_low" not in agent.faults
        assert all("disk_low" not in codes for codes in faults_in_state(collector))
        assert not any("disk_low" in name for name in scrape(port))


def test_a_file_system_that_cannot_be_measured_is_logged_once(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with running(tmp_path, broker, 1, port) as agent:
        wait_for(lambda: agent.parts_inspected > 10, 30, "parts inspected")
        key = 'linesight_disk_free_bytes{station="press-01"}'
        data_dir = agent.config.data_dir
        gone = tmp_path / "unmounted"
        agent.config.data_dir = gone
        with caplog.at_level(logging.INFO, logger="edge_agent.agent"):
            agent._check_disk_space()
            agent._check_disk_space()
            assert math.isnan(scrape(port)[key])
            agent.config.data_dir = data_dir
            agent._check_disk_space()
        said = [r.getMessage() for r in caplog.records if "free space" in r.getMessage()]
        assert said == [
            f"cannot measure the free space of {gone}: [Errno 2] No such file or directory: "
            f"'{gone}'",
            f"the free space of {data_dir.absolute()} can be measured again",
        ]
        assert scrape(port)[key] > MB
        assert "disk_low" not in agent.faults


def _status_codes(agent: Agent) -> set[str]:
    saved = agent.store.load_status()
    document: dict[str, Any] = saved[0] if saved else {}
    return {fault["code"] for fault in document.get("faults", [])}
