"""The stage's evidence and the dashboard's series kept as running totals: every answer equals
what a query over every row of the window gives, over randomised ingest (late rows, duplicates,
verdicts before and after their results, station clocks off), prunes and restarts; and the work
of bringing them up to date does not grow with the rows the window holds."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy import fleet_store, fleet_tally
from deploy.fleet_store import (
    SeriesPoint,
    SqliteFleetStore,
    paired_evidence_by_query,
    series_counts_by_query,
)
from deploy.fleet_tally import Disputes, SlowestLatencies, p95_rank
from deploy.rollout import StageEvidence
from linesight import protocol as p

T0 = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="1.1.0", sha256="c" * 64)
OTHER = p.ModelRef(name="part-classifier", version="1.2.0", sha256="e" * 64)

StageQuery = tuple[list[str], datetime, str, str]


def us(moment: datetime) -> int:
    return round(moment.timestamp() * 1_000_000)


def stage_by_query(store: SqliteFleetStore, query: StageQuery) -> StageEvidence:
    stations, since, candidate, label = query
    with store._snapshot() as conn:
        return paired_evidence_by_query(
            conn, fleet_store._stations_param(stations), us(since), candidate, label
        )


def series_by_query(
    store: SqliteFleetStore, stations: list[str], since: datetime, bucket_s: int,
    candidate: str | None, until: datetime,
) -> list[SeriesPoint]:
    key = (fleet_store._stations_param(stations), bucket_s * 1_000_000, candidate)
    with store._snapshot() as conn:
        counts = series_counts_by_query(conn, key, us(since), us(until))
    return fleet_store._series_points(counts, bucket_s * 1_000_000)


class Line:
    """Random station traffic: decisions, shadow results and verdicts on a small pool of
    parts (so verdicts meet disagreements, before and after them), redeliveries, station
    clocks off by up to a minute, and batches received late."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seqs = {"a": 0, "b": 0, "c": 0}
        self.sent: list[p.Envelope] = []
        self.clock = T0
        self.drift = rng.random() < 0.5  # the candidate gets ever faster: the p95 refills

    def _next(self, station: str) -> int:
        self.seqs[station] += 1
        return self.seqs[station] - 1

    def latency(self) -> float:
        if self.drift:
            return max(0.1, 50.0 - len(self.sent) * 0.05 + self.rng.random())
        return self.rng.choice([2.0, 3.0, 3.0, 7.5, self.rng.uniform(1, 20)])

    def message(self) -> p.Envelope:
        rng = self.rng
        if self.sent and rng.random() < 0.08:
            return rng.choice(self.sent)  # redelivered
        station = rng.choice("abc")
        part_id = f"part-{rng.randrange(40)}"
        ts = self.clock + timedelta(seconds=rng.uniform(-60, 60))
        kind = rng.random()
        message: p.Envelope
        if kind < 0.65:
            labels = ["ok", "ok", "defect", None]
            active, candidate = rng.choice(labels), rng.choice(labels)
            message = p.ShadowResult(
                station=station, seq=self._next(station), ts=ts, part_id=part_id,
                mode=p.DeploymentMode.SHADOW,
                active=p.ModelOpinion(model=ACTIVE, label=active, latency_ms=3.0),
                candidate=p.ModelOpinion(model=rng.choice([CANDIDATE, CANDIDATE, OTHER]),
                                         label=candidate, latency_ms=self.latency()),
                agree=active is not None and active == candidate,
            )
        elif kind < 0.85:
            outcome = rng.choice(list(p.VerdictOutcome))
            message = p.Verdict(
                station=station, seq=self._next(station), ts=ts, part_id=part_id,
                operator="op-7", outcome=outcome,
                label=None if outcome == p.VerdictOutcome.ESCALATE else "ok",
                review_reason=p.ReviewReason.DISAGREEMENT, decided_at=ts,
            )
        else:
            action = rng.choice([p.Action.PASS, p.Action.REJECT, p.Action.REVIEW])
            message = p.Decision(
                station=station, seq=self._next(station), ts=ts, part_id=part_id,
                decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=action,
                review_reason=(p.ReviewReason.LOW_CONFIDENCE if action == p.Action.REVIEW
                               else None),
                model=ACTIVE, latency_ms=3.0, automation=p.AutomationLevel.FULL,
                mode=p.DeploymentMode.SHADOW,
            )
        self.sent.append(message)
        return message

    def batch(self) -> tuple[list[p.Envelope], datetime]:
        """Messages and when they are received: mostly now, sometimes late (before the
        clock, inside windows already counted)."""
        self.clock += timedelta(seconds=self.rng.uniform(0, 4))
        received = self.clock
        if self.rng.random() < 0.15:
            received -= timedelta(seconds=self.rng.uniform(0, 90))
        return [self.message() for _ in range(self.rng.randint(1, 8))], received


@pytest.fixture
def small_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tight limits, so that short random runs go through every path: the p95's reserve
    trimmed and refilled, a series' totals sliding and rebuilt, a long catch-up rebuilt."""
    monkeypatch.setattr(fleet_tally, "RESERVE_SLACK", 2)
    monkeypatch.setattr(fleet_store, "_SERIES_AHEAD_S", 40)
    monkeypatch.setattr(fleet_store, "_CATCH_UP_MAX_ROWS", 150)


@pytest.mark.usefixtures("small_totals")
@pytest.mark.parametrize("seed", range(6))
def test_running_totals_equal_a_query_over_the_whole_window(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    line = Line(rng)
    stages: list[StageQuery] = [
        (["a", "b"], T0 + timedelta(seconds=30), CANDIDATE.sha256, "defect"),
        (["a", "b", "c"], T0, CANDIDATE.sha256, "defect"),
        (["c"], T0 + timedelta(seconds=60), OTHER.sha256, "ok"),
    ]
    series: list[tuple[list[str], int, str | None, int]] = [
        (["a", "b", "c"], 10, None, 120),  # (stations, bucket_s, candidate, window_s)
        (["a"], 7, CANDIDATE.sha256, 60),
        (["b", "c"], 30, None, 600),
    ]
    store = SqliteFleetStore(tmp_path / "fleet.db")
    compared = prunes = restarts = 0
    try:
        for _ in range(160):
            messages, received = line.batch()
            store.ingest(messages, received=received)
            roll = rng.random()
            if roll < 0.04:
                before = T0 + (line.clock - T0) * rng.random()
                prunes += store.prune(before, batch=rng.choice([3, 5000])) > 0
            elif roll < 0.08:
                store.close()
                store = SqliteFleetStore(tmp_path / "fleet.db")
                restarts += 1
            for query in rng.sample(stages, rng.randint(0, len(stages))):
                assert store.paired_evidence(*query) == stage_by_query(store, query), query
                compared += 1
            for stations, bucket_s, candidate, window_s in rng.sample(series, 2):
                until = line.clock + timedelta(seconds=rng.choice([0, 0.5, bucket_s]))
                since = until - timedelta(seconds=window_s + rng.choice([0, 1.25]))
                assert store.evidence_series(stations, since, bucket_s, candidate, until) == (
                    series_by_query(store, stations, since, bucket_s, candidate, until)
                ), (stations, since, until)
                compared += 1
    finally:
        store.close()
    assert compared > 300 and (prunes or restarts)


def test_a_prune_of_the_stages_rows_is_counted_out(tmp_path: Path) -> None:
    """The tally counted the rows a prune then deletes: the next answer is without them."""
    line = Line(random.Random(7))
    query: StageQuery = (["a", "b", "c"], T0, CANDIDATE.sha256, "defect")
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        for _ in range(40):
            messages, received = line.batch()
            store.ingest(messages, received=received)
        before = store.paired_evidence(*query)
        assert store.prune(line.clock - timedelta(seconds=30)) > 0
        after = store.paired_evidence(*query)
        assert after == stage_by_query(store, query)
        assert after.overall.parts < before.overall.parts


def test_a_verdict_long_after_its_result_labels_it(tmp_path: Path) -> None:
    """The result was counted unlabelled ticks ago; the operator's verdict, and a supervisor's
    later one that overturns it, change the evidence without the result coming again."""
    query: StageQuery = (["a"], T0, CANDIDATE.sha256, "defect")
    disagreement = p.ShadowResult(
        station="a", seq=0, ts=T0, part_id="p1", mode=p.DeploymentMode.SHADOW,
        active=p.ModelOpinion(model=ACTIVE, label="ok", latency_ms=3.0),
        candidate=p.ModelOpinion(model=CANDIDATE, label="defect", latency_ms=4.0), agree=False,
    )

    def verdict(seq: int, outcome: p.VerdictOutcome) -> p.Verdict:
        return p.Verdict(station="a", seq=seq, ts=T0, part_id="p1", operator="op-7",
                         outcome=outcome, label=None, review_reason=p.ReviewReason.DISAGREEMENT,
                         decided_at=T0)

    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([disagreement], received=T0)
        assert store.paired_evidence(*query).overall.labelled_disagreements == 0
        store.ingest([verdict(1, p.VerdictOutcome.REJECT)], received=T0)
        labelled = store.paired_evidence(*query)
        assert (labelled.escapes.labelled_disagreements, labelled.escapes.candidate_right) == (
            1, 1)
        store.ingest([verdict(2, p.VerdictOutcome.ESCALATE)], received=T0)
        assert store.paired_evidence(*query) == labelled, "an escalation changes nothing"
        store.ingest([verdict(3, p.VerdictOutcome.PASS)], received=T0)
        overturned = store.paired_evidence(*query)
        assert overturned == stage_by_query(store, query)
        assert (overturned.overall.candidate_right, overturned.escapes.labelled_disagreements) == (
            0, 0)


def test_a_series_before_1970_is_answered_like_any_other(tmp_path: Path) -> None:
    """A station whose clock was reset to the epoch dates parts before it: SQLite rounds their
    buckets towards zero, and the series does as it always did."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    with SqliteFleetStore(tmp_path / "fleet.db") as store:
        store.ingest([
            p.Decision(station="a", seq=seq, ts=epoch + timedelta(seconds=offset),
                       part_id=f"p{seq}", decided_by=p.DecidedBy.ACTIVE, label="ok",
                       confidence=0.9, action=p.Action.PASS, model=ACTIVE, latency_ms=3.0,
                       automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.SHADOW)
            for seq, offset in enumerate([-25, -5, 3, 12, 27])
        ])
        since, until = epoch - timedelta(seconds=30), epoch + timedelta(seconds=30)
        points = store.evidence_series(["a"], since, 10, until=until)
        assert points == series_by_query(store, ["a"], since, 10, None, until)
        assert sum(point.parts for point in points) == 5


# --- the bookkeeping on its own -------------------------------------------------------------


def nearest_rank_p95(values: list[float]) -> float | None:
    if not values:
        return None
    return sorted(values, reverse=True)[len(values) - math.ceil(0.95 * len(values))]


@pytest.mark.parametrize("seed", range(20))
def test_the_kept_latencies_give_the_p95_of_all_of_them(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the sort of every value: ties, a candidate that gets faster (the values it
    let go are then needed, and come from the store again), one that gets slower."""
    monkeypatch.setattr(fleet_tally, "RESERVE_SLACK", seed % 3 + 1)
    rng = random.Random(seed)
    trend = rng.choice([-0.1, 0.0, 0.1])
    values: list[float] = [rng.choice([1.0, 2.0, 2.0, 5.0]) for _ in range(rng.randrange(40))]
    wanted = SlowestLatencies.wanted(len(values))
    slowest = SlowestLatencies(sorted(values, reverse=True)[:wanted], len(values),
                               complete=wanted >= len(values))
    refills = 0
    for index in range(800):
        value = round(100 + trend * index + rng.gauss(0, 5), 1)
        values.append(value)
        slowest.add(value)
        if slowest.needs_refill:
            refills += 1
            wanted = SlowestLatencies.wanted(len(values))
            slowest = SlowestLatencies(sorted(values, reverse=True)[:wanted], len(values),
                                       complete=wanted >= len(values))
        assert slowest.p95() == nearest_rank_p95(values)
        assert slowest.kept <= 3 * (p95_rank(len(values)) + 3) + 1
    if trend < 0:
        assert refills, "a faster candidate needs the values let go"


def test_no_latency_means_no_p95() -> None:
    assert SlowestLatencies([], 0, complete=True).p95() is None
    with pytest.raises(ValueError, match="3 latencies given for 2 results"):
        SlowestLatencies([3.0, 2.0, 1.0], 2, complete=True)


def test_a_part_disputed_twice_counts_twice_under_its_latest_verdict() -> None:
    disputes = Disputes()
    part_id = ("a", "p1")
    disputes.add(part_id, candidate_says_defect=True, defect=None)
    disputes.add(part_id, candidate_says_defect=False, defect=True)  # a verdict came between
    assert (disputes.labelled, disputes.candidate_right, disputes.labelled_defect,
            disputes.defect_right) == (2, 1, 2, 1)
    disputes.label(part_id, defect=False)
    assert (disputes.labelled, disputes.candidate_right, disputes.labelled_defect,
            disputes.defect_right) == (2, 1, 0, 0)
    disputes.label(("a", "other"), defect=True)  # not disputed: nothing to count
    assert disputes.labelled == 2


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFleetStore]:
    with SqliteFleetStore(tmp_path / "fleet.db") as opened:
        yield opened


def test_two_stores_on_one_file_answer_alike(store: SqliteFleetStore, tmp_path: Path) -> None:
    """A summary opened beside the controller (the demo's) builds its own totals."""
    line = Line(random.Random(3))
    for _ in range(20):
        messages, received = line.batch()
        store.ingest(messages, received=received)
    query: StageQuery = (["a", "b", "c"], T0, CANDIDATE.sha256, "defect")
    with SqliteFleetStore(tmp_path / "fleet.db") as beside:
        assert beside.paired_evidence(*query) == store.paired_evidence(*query)
