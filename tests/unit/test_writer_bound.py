"""The writer's bound: while its commit hangs, `wait_for_room` says there is none once
`max_backlog` items wait, and there is room again as soon as the writer takes its next batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import StationStore
from edge_agent.writer import DurableWriter
from linesight import protocol as p

pytestmark = pytest.mark.unit

STATION = "st-1"
TOPIC = p.Topics().station(STATION, p.Channel.DECISION)


def decision(seq: int) -> p.Decision:
    return p.Decision(
        station=STATION, seq=seq, part_id=f"p{seq}", decided_by=p.DecidedBy.OPERATOR,
        label=None, action=p.Action.REVIEW, review_reason=p.ReviewReason.HUMAN_ONLY, model=None,
        latency_ms=0.0, automation=p.AutomationLevel.HUMAN_ONLY, mode=p.DeploymentMode.NONE,
    )


@pytest.fixture
def store(tmp_data_dir: Path) -> Iterator[StationStore]:
    with StationStore(tmp_data_dir) as opened:
        yield opened


def test_no_room_while_the_commit_hangs_and_room_once_it_answers(
    store: StationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    answering = threading.Event()
    in_commit = threading.Event()
    commit = store.enqueue_many

    def hanging_commit(*args: Any, **kwargs: Any) -> Any:
        in_commit.set()
        answering.wait()
        return commit(*args, **kwargs)

    monkeypatch.setattr(store, "enqueue_many", hanging_commit)
    writer = DurableWriter(store, max_batch=4, max_backlog=10)
    try:
        writer.enqueue(TOPIC, 1, decision)
        assert in_commit.wait(5)  # the first batch is in the hanging commit
        for _ in range(10):
            writer.enqueue(TOPIC, 1, decision)
        assert writer.full and writer.backlog == 10
        assert not writer.wait_for_room(0.05)
        answering.set()
        assert writer.wait_for_room(5)
        assert writer.flush()
    finally:
        answering.set()
        writer.close()
    assert store.outbox_depth() == 11, "nothing waiting is lost"


def test_a_bound_below_one_is_refused(store: StationStore) -> None:
    with pytest.raises(ValueError, match="max_backlog"):
        DurableWriter(store, max_backlog=0)
