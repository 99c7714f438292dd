"""Shared fixtures: a real mosquitto per test, and unit/integration markers by folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from linesight.broker import Broker, start_broker

_TESTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The folder says what a test needs; `pytest -m unit` then runs without any process.
    for item in items:
        parts = (
            item.path.relative_to(_TESTS_DIR).parts if item.path.is_relative_to(_TESTS_DIR) else ()
        )
        if parts[:1] == ("unit",):
            item.add_marker(pytest.mark.unit)
        elif parts[:1] == ("integration",):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty directory a test may use as a process's data dir."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return data_dir


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto owned by this test, on a free 127.0.0.1 port; stopped by pid afterwards."""
    running = start_broker(tmp_path / "broker")
    try:
        yield running
    finally:
        running.stop()
