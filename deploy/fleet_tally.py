"""Running totals behind the fleet store's two queries that are asked all the time.

A stage's evidence (every controller tick) and the dashboard's series (every refresh of every
open dashboard) were each a query over every row of their window: an hour into a stage at a
plant's rate, over a second per tick. `SqliteFleetStore` now keeps these totals and brings them
up to date with only the rows stored since it last looked (by row id: every new row gets a
higher one), rebuilding them from scratch when that shortcut could be wrong
(docs/decisions/0016-fleet-store-running-totals.md). This module is the pure bookkeeping; the
SQL is in `deploy/fleet_store.py`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RESERVE_SLACK",
    "Disputes",
    "SeriesCounts",
    "SlowestLatencies",
    "p95_rank",
]

RESERVE_SLACK = 64
"""Latencies kept below the p95's, beyond as many as it has: its rank rises as results come in."""


def p95_rank(results: int) -> int:
    """The nearest-rank p95 of `results` values is the p95_rank-th largest (0 when none)."""
    return results - math.ceil(0.95 * results) + 1 if results else 0


class SlowestLatencies:
    """The slowest latencies of a stage's results: enough of them to give its nearest-rank p95
    exactly as results come in, without keeping the other 90 % or so.

    `top` holds the p95_rank(results) largest values (its smallest is the p95), `reserve` the
    next ones down. Every value let go is at most `floor`, which is at most every value kept:
    the kept values are always the true largest. The p95's rank rises by one every 20 results;
    it takes from the reserve, and only when the reserve ran dry after values were let go does
    it need the values again from the store (`needs_refill`).
    """

    def __init__(self, largest_first: Iterable[float], results: int, complete: bool) -> None:
        """`largest_first`: the largest latencies of the `results`, in descending order; all of
        them when `complete`, else every one not given is at most the last one given."""
        values = list(largest_first)
        if len(values) > results:
            raise ValueError(f"{len(values)} latencies given for {results} results")
        self.results = results
        rank = p95_rank(results)
        self._top = values[:rank]
        self._top.reverse()  # ascending: already a min-heap
        self._reserve = [-value for value in values[rank:]]  # descending: a max-heap
        self._floor = -math.inf if complete or not values else values[-1]

    @staticmethod
    def wanted(results: int) -> int:
        """How many of the largest latencies to ask the store for when (re)building."""
        rank = p95_rank(results)
        return rank + max(rank, RESERVE_SLACK)

    @property
    def kept(self) -> int:
        return len(self._top) + len(self._reserve)

    @property
    def needs_refill(self) -> bool:
        return len(self._top) < p95_rank(self.results)

    def add(self, latency: float) -> None:
        self.results += 1
        if latency < self._floor:
            pass  # below every value kept, and below one let go already: not the p95's
        elif self._top and latency < self._top[0]:
            heapq.heappush(self._reserve, -latency)
        else:
            heapq.heappush(self._top, latency)
        rank = p95_rank(self.results)
        while len(self._top) > rank:
            heapq.heappush(self._reserve, -heapq.heappop(self._top))
        while len(self._top) < rank and self._reserve:
            heapq.heappush(self._top, -heapq.heappop(self._reserve))
        if len(self._reserve) > 2 * max(rank, RESERVE_SLACK):
            self._trim_reserve(max(rank, RESERVE_SLACK))

    def _trim_reserve(self, keep: int) -> None:
        descending = sorted((-value for value in self._reserve), reverse=True)
        self._floor = max(self._floor, descending[keep])
        self._reserve = [-value for value in descending[:keep]]  # descending: a max-heap

    def p95(self) -> float | None:
        """The nearest-rank p95 of every result added; None without results."""
        if not self.results:
            return None
        if self.needs_refill:
            raise RuntimeError("the p95's latency was let go: rebuild from the store first")
        return self._top[0]


@dataclass(slots=True)
class _Dispute:
    """The disagreements on one part (usually one result), and its truth."""

    candidate_says_defect: int = 0
    candidate_says_good: int = 0
    defect: bool | None = None
    """The latest pass (False) or reject (True) verdict on the part; None while it has none."""

    def counts(self) -> tuple[int, int, int, int]:
        """(labelled, candidate right, labelled defects, candidate right on a defect)."""
        if self.defect is None:
            return 0, 0, 0, 0
        rows = self.candidate_says_defect + self.candidate_says_good
        if self.defect:
            return rows, self.candidate_says_defect, rows, self.candidate_says_defect
        return rows, self.candidate_says_good, 0, 0


@dataclass(slots=True)
class Disputes:
    """A stage's disagreements by part, with their verdicts' totals kept up to date: a verdict
    arrives (or changes) long after the result it labels."""

    labelled: int = 0
    candidate_right: int = 0
    labelled_defect: int = 0
    defect_right: int = 0
    _parts: dict[tuple[str, str], _Dispute] = field(default_factory=dict)

    def __contains__(self, part: tuple[str, str]) -> bool:
        return part in self._parts

    def add(self, part: tuple[str, str], candidate_says_defect: bool, defect: bool | None) -> None:
        """One more disagreement on (station, part_id); `defect` is its latest verdict."""
        dispute = self._parts.setdefault(part, _Dispute())
        self._count(dispute, -1)
        if candidate_says_defect:
            dispute.candidate_says_defect += 1
        else:
            dispute.candidate_says_good += 1
        dispute.defect = defect
        self._count(dispute, +1)

    def label(self, part: tuple[str, str], defect: bool) -> None:
        """A newer pass or reject verdict on a part (ignored for a part not disputed)."""
        dispute = self._parts.get(part)
        if dispute is None:
            return
        self._count(dispute, -1)
        dispute.defect = defect
        self._count(dispute, +1)

    def _count(self, dispute: _Dispute, sign: int) -> None:
        labelled, right, defect, defect_right = dispute.counts()
        self.labelled += sign * labelled
        self.candidate_right += sign * right
        self.labelled_defect += sign * defect
        self.defect_right += sign * defect_right


@dataclass(slots=True)
class SeriesCounts:
    """Decisions by action and shadow pairs (count, agreed) per time bucket."""

    actions: dict[int, dict[str, int]] = field(default_factory=dict)
    pairs: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add_actions(self, bucket: int, action: str, count: int) -> None:
        by_action = self.actions.setdefault(bucket, {})
        by_action[action] = by_action.get(action, 0) + count

    def add_pairs(self, bucket: int, count: int, agreed: int) -> None:
        before = self.pairs.get(bucket, (0, 0))
        self.pairs[bucket] = (before[0] + count, before[1] + agreed)

    def add(self, other: SeriesCounts) -> None:
        for bucket, by_action in other.actions.items():
            for action, count in by_action.items():
                self.add_actions(bucket, action, count)
        for bucket, (count, agreed) in other.pairs.items():
            self.add_pairs(bucket, count, agreed)

    def add_range(self, other: SeriesCounts, first: int, last: int) -> None:
        """Add `other`'s buckets from `first` to `last`, both included."""
        for bucket in _buckets_within(other.actions, first, last):
            for action, count in other.actions[bucket].items():
                self.add_actions(bucket, action, count)
        for bucket in _buckets_within(other.pairs, first, last):
            self.add_pairs(bucket, *other.pairs[bucket])

    def drop_before(self, first: int) -> None:
        for buckets in (self.actions, self.pairs):
            for bucket in [b for b in buckets if b < first]:
                del buckets[bucket]


def _buckets_within(buckets: dict[int, Any], first: int, last: int) -> list[int]:
    """The keys of `buckets` from `first` to `last`: by the range or by the keys, whichever is
    shorter (a long window may hold few buckets with data, a day's totals many outside it)."""
    if last - first + 1 <= len(buckets):
        return [bucket for bucket in range(first, last + 1) if bucket in buckets]
    return [bucket for bucket in buckets if first <= bucket <= last]
