"""The fleet simulation (front door).

Its simulated operators, used by the demo and the tests too, answer a station's review queue
from the synthetic parts' ground truth, with a configurable error rate, through the same local
store the station UI writes to."""

from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.store import StationStore
from edge_agent.synthetic import PartGenerator, parse_part_id

log = logging.getLogger(__name__)


class SimulatedOperator:
    def __init__(
        self,
        data_dir: Path,
        *,
        defect_rate: float = 0.3,
        error_rate: float = 0.0,
        seed: int = 0,
        badge: str = "sim-operator",
        interval_s: float = 0.2,
        delay_s: float = 0.0,
    ) -> None:
        self.data_dir = data_dir
        self.defect_rate = defect_rate
        self.error_rate = error_rate
        self.badge = badge
        self.interval_s = interval_s
        self.delay_s = delay_s
        self.answered = 0
        self._random = random.Random(seed)  # noqa: S311 - simulation, not security
        self._generators: dict[int, PartGenerator] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def truth(self, part_id: str) -> str:
        seed, index = parse_part_id(part_id)
        generator = self._generators.setdefault(seed, PartGenerator(seed, self.defect_rate))
        return "defect" if generator.part(index).defect is not None else "ok"

    def answer_pending(self, store: StationStore) -> int:
        """Judge every part waiting long enough; a person in the UI may have answered first."""
        answered = 0
        now = datetime.now(UTC)
        for item in store.pending_reviews(limit=200):
            if (now - item.created).total_seconds() < self.delay_s:
                continue
            try:
                label = self.truth(item.part_id)
            except ValueError:
                continue  # not a synthetic part: leave it to a person
            if self._random.random() < self.error_rate:
                label = "ok" if label == "defect" else "defect"
            outcome = "reject" if label == "defect" else "pass"
            if store.record_verdict(item.part_id, self.badge, outcome, label, now):
                answered += 1
        self.answered += answered
        return answered

    def start(self) -> SimulatedOperator:
        self._thread = threading.Thread(target=self._run, name=f"operator-{self.badge}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        store = StationStore(self.data_dir)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.answer_pending(store)
                except Exception:  # keep answering; the store may be busy  # noqa: BLE001
                    log.exception("simulated operator %s failed", self.badge)
        finally:
            store.close()
