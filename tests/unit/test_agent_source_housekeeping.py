"""The source's reconnects and the PLC triggers a station cannot use, in the metrics by the
once-a-second housekeeping read, without waiting for the next state publication."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from linesight.mqtt import ReceivedMessage
from tests.support import station_config

pytestmark = pytest.mark.unit

STATION = "press-01"


class FlappingCamera:
    """A live source stand-in whose stream drops and comes back between state publications."""

    frame_age_s = 0.0

    def __init__(self) -> None:
        self.reconnects = 0

    def read(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def build(tmp_data_dir: Path) -> Iterator[list[Agent]]:
    """Agents made by the test, their link never started (nothing reaches a broker)."""
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.writer.close()
        agent.gate.close()
        agent.source.close()
        agent.store.close()


def _agent(tmp_data_dir: Path, made: list[Agent], **kwargs: object) -> Agent:
    agent = Agent(station_config(tmp_data_dir, "mqtt://127.0.0.1:1883", station=STATION,
                                 outbox__relay="thread"), **kwargs)  # type: ignore[arg-type]
    made.append(agent)
    return agent


def _sample(agent: Agent, name: str) -> float | None:
    return agent.metrics.registry.get_sample_value(name, {"station": STATION})


def test_a_flapping_camera_shows_in_the_reconnects_gauge_before_the_state_is_published(
    tmp_data_dir: Path, build: list[Agent],
) -> None:
    camera = FlappingCamera()
    agent = _agent(tmp_data_dir, build, source=camera)
    camera.reconnects = 3
    agent._count_source_losses()  # housekeeping's once-a-second read; no state published
    assert _sample(agent, "linesight_source_reconnects") == 3
    camera.reconnects = 5
    agent._count_source_losses()
    assert _sample(agent, "linesight_source_reconnects") == 5


def test_a_plc_trigger_for_a_source_that_takes_every_frame_is_counted_ignored(
    tmp_data_dir: Path, build: list[Agent],
) -> None:
    """The synthetic source (like a folder or a video) has no trigger: the PLC and the
    station's configuration disagree, and the triggers are counted, each once."""
    agent = _agent(tmp_data_dir, build)
    assert not hasattr(agent.source, "trigger")
    topic = agent.topics.trigger(STATION)
    for payload in (b'{"part_id": "P1"}', b""):
        agent._on_trigger(ReceivedMessage(topic, payload, 1, False))
    agent._count_source_losses()
    agent._count_source_losses()  # read again with nothing new: counted once
    assert _sample(agent, "linesight_source_ignored_triggers_total") == 2
    assert _sample(agent, "linesight_parts_missed_total") == 0
