"""Frames no model can judge (an empty image from a camera's decoder): the part is held by the
fail-safe, the station says why, and the inspection goes on with the next part. Real agent and
bundles; no broker."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_agent.agent import Agent
from edge_agent.sources import EndOfSource, Frame
from edge_agent.store import StationStore
from linesight import protocol as p
from tests.support import station_config


class ListSource:
    """Hands on the given images, then ends."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.reconnects = 0
        self.frame_age_s = 0.0

    def read(self, timeout: float) -> Frame | None:
        if not self.images:
            raise EndOfSource("no more images")
        image = self.images.pop(0)
        return Frame(part_id=f"part-{len(self.images)}", image=image, captured_at=time.time())

    def close(self) -> None:
        self.images = []


def test_an_empty_frame_is_held_and_the_inspection_goes_on(tmp_path: Path) -> None:
    good = np.full((64, 64, 3), 128, np.uint8)
    images = [good, np.zeros((0, 0, 3), np.uint8), good, np.zeros((48, 0, 3), np.uint8), good]
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", automation="full",
                            drift_sample_every=1, outbox__relay="thread",
                            outbox__receipt_wait_s=0.2)
    agent = Agent(config, source=ListSource(images))
    assert agent.run() == 0
    assert agent.parts_inspected == 5, "the inspection stopped at a frame it could not judge"
    assert "review_image" in agent.faults, "a held part with no review image, and no fault"
    with StationStore(tmp_path) as store:
        decisions = [
            p.parse(p.Decision, row.payload) for row in store.pending(100)
            if row.topic.endswith("/decision")
        ]
    held = {d.part_id: d for d in decisions if d.decided_by == p.DecidedBy.FAILSAFE}
    assert set(held) == {"part-3", "part-1"}
    assert all(d.action == p.Action.REVIEW for d in held.values())
