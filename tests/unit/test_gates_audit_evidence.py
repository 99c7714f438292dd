"""The gate's evidence as the fleet store counts it, audited on the edge cases a line produces:
duplicate verdicts for one part, verdicts that arrive after their stage, fail-safe parts. Each
case is checked on a fresh store (totals built from the whole window) and on one that counted
the results first and the verdicts after (running totals brought up to date)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deploy.fleet_store import SqliteFleetStore
from deploy.gates import PairedEvidence
from linesight import protocol as p
from tests.unit.test_fleet_store import CANDIDATE, T0, shadow, verdict

pytestmark = pytest.mark.unit

Messages = list[p.ShadowResult | p.Verdict]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[[str], SqliteFleetStore]]:
    opened: list[SqliteFleetStore] = []

    def open_store(name: str) -> SqliteFleetStore:
        store = SqliteFleetStore(tmp_path / f"{name}.db")
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def both_ways(
    fresh: Callable[[str], SqliteFleetStore], results: Messages, verdicts: Messages
) -> list[tuple[PairedEvidence, PairedEvidence, int | None]]:
    """The stage's (overall, escapes, possible escapes) counted both ways."""
    answers = []
    whole = fresh("whole")
    whole.ingest([*results, *verdicts], received=T0)
    running = fresh("running")
    running.ingest(results, received=T0)
    running.paired_evidence(["a"], T0, CANDIDATE.sha256)  # running totals start here
    running.ingest(verdicts, received=T0)
    for store in (whole, running):
        evidence = store.paired_evidence(["a"], T0, CANDIDATE.sha256)
        answers.append((evidence.overall, evidence.escapes, evidence.possible_escapes))
    return answers


def test_duplicate_verdicts_for_one_part_count_it_once_by_its_latest_pass_or_reject(
    fresh: Callable[[str], SqliteFleetStore],
) -> None:
    results: Messages = [
        shadow("a", 0, "p0", "ok", "defect"),  # candidate says defect
        shadow("a", 1, "p1", "defect", "ok"),  # candidate says ok
        shadow("a", 2, "p2", "ok", "ok"),
    ]
    verdicts: Messages = [
        verdict("a", 3, "p0", "defect"),
        verdict("a", 4, "p0", "defect"),  # the same verdict again: still one label
        verdict("a", 5, "p1", "ok"),
        verdict("a", 6, "p1", "defect"),  # corrected: p1 is a defect, the candidate missed it
        verdict("a", 7, "p1", None),  # an escalation after it hides nothing
    ]
    for overall, escapes, possible in both_ways(fresh, results, verdicts):
        assert overall == PairedEvidence(3, 2, 2, 1)
        assert escapes == PairedEvidence(3, 2, 2, 1)
        assert possible == 2


def test_fail_safe_parts_are_not_pairs_but_their_latency_counts(
    fresh: Callable[[str], SqliteFleetStore],
) -> None:
    results: Messages = [
        shadow("a", 0, "p0", "ok", "ok", latency_ms=4.0),
        shadow("a", 1, "p1", None, "ok", latency_ms=5.0),  # the active model failed
        shadow("a", 2, "p2", "ok", None, latency_ms=900.0),  # the candidate failed
    ]
    verdicts: Messages = [verdict("a", 3, "p1", "defect"), verdict("a", 4, "p2", "defect")]
    for overall, escapes, possible in both_ways(fresh, results, verdicts):
        assert overall == PairedEvidence(1, 0, 0, 0)
        assert escapes == PairedEvidence(1, 0, 0, 0)
        assert possible == 0
    store = fresh("latency")
    store.ingest(results, received=T0)
    assert store.paired_evidence(["a"], T0, CANDIDATE.sha256).p95_latency_ms == 900.0


def test_a_verdict_after_its_stage_ended_does_not_count_in_the_next_stage(
    fresh: Callable[[str], SqliteFleetStore],
) -> None:
    store = fresh("stages")
    store.ingest([shadow("a", 0, "p0", "ok", "defect")], received=T0)
    next_stage = T0 + timedelta(seconds=60)
    before = store.paired_evidence(["a"], next_stage, CANDIDATE.sha256)
    # The verdict on the first stage's part comes in during the next stage.
    store.ingest([verdict("a", 1, "p0", "defect"), shadow("a", 2, "p1", "ok", "ok")],
                 received=next_stage + timedelta(seconds=1))
    after = store.paired_evidence(["a"], next_stage, CANDIDATE.sha256)
    assert before.overall == PairedEvidence(0, 0, 0, 0)
    assert after.overall == PairedEvidence(1, 0, 0, 0)
    assert after.possible_escapes == 0
    # Asked for the first stage's window, the part has its label now.
    first = store.paired_evidence(["a"], T0, CANDIDATE.sha256)
    assert first.overall == PairedEvidence(2, 1, 1, 1)
