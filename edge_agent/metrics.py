"""Prometheus metrics of one station, in a registry of its own (several agents may share a
process in tests and simulations)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000)
_CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_MAX_SOURCE_LAYERS = 8  # a trigger around a reader is two; a loop of `inner`s must not hang


@dataclass(frozen=True, slots=True)
class SourceLosses:
    """What a frame source has counted of the parts and frames it lost since it opened; None
    where it does not count that (see docs/sources.md for each counter)."""

    missed_triggers: int | None = None  # external trigger: got no frame, or its frame let go
    ignored_triggers: int | None = None  # triggers that came in another trigger mode
    skipped: int | None = None  # folder, video: images or frames that do not decode
    frames_let_go: int | None = None  # frames held for triggers, let go to keep the budget
    failed_reads: int | None = None  # live: reads that gave no frame (a corrupt frame)
    held_bytes: int | None = None  # live: bytes of the frames held for triggers, now

    @property
    def parts_missed(self) -> int | None:
        """Parts the station did not inspect, or None when the source counts none it misses.
        A let-go frame is already counted in its trigger, a failed live read is no part."""
        counted = [n for n in (self.missed_triggers, self.skipped) if n is not None]
        return sum(counted) if counted else None


def _source_layers(source: object) -> list[object]:
    """The source and the ones it wraps (a trigger's reader is its ``inner``), outermost first."""
    layers = [source]
    while len(layers) < _MAX_SOURCE_LAYERS:
        inner = getattr(layers[-1], "inner", None)
        if inner is None:
            break
        layers.append(inner)
    return layers


def read_source_losses(source: object) -> SourceLosses:
    """The source's loss counters, each from the outermost layer that has it: a wrapper that
    came to pass one on (or count it itself) must not have it counted twice."""
    layers = _source_layers(source)
    found: dict[str, int] = {}
    for name in (f.name for f in fields(SourceLosses)):
        for layer in layers:
            value = getattr(layer, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                found[name] = value
                break
    return SourceLosses(**found)


def counted_since(now: int | None, before: int | None) -> int:
    """How much a source's counter rose between two readings: a counter that went back (a
    source opened anew counts from 0) has counted nothing new yet."""
    return max(0, (now or 0) - (before or 0))


class AgentMetrics:
    def __init__(self, station: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"station": station}
        r = self.registry
        self.parts = Counter(
            "linesight_parts", "Parts inspected", ["station"], registry=r
        ).labels(**labels)
        self.decisions = Counter(
            "linesight_decisions", "Decisions by action and decider",
            ["station", "action", "decided_by"], registry=r,
        )
        self.confidence = Histogram(
            "linesight_confidence", "Model confidence per slot", ["station", "slot"],
            buckets=_CONFIDENCE_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "linesight_inference_latency_ms", "Inference latency per slot (ms)",
            ["station", "slot"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.shadow_pairs = Counter(
            "linesight_shadow_pairs", "Parts both models judged", ["station"], registry=r
        ).labels(**labels)
        self.disagreements = Counter(
            "linesight_disagreements", "Parts where the models disagreed", ["station"], registry=r
        ).labels(**labels)
        self.agreement = Gauge(
            "linesight_agreement_rate", "Agreement over the last window", ["station"], registry=r
        ).labels(**labels)
        self.candidate_skipped = Counter(
            "linesight_candidate_skipped", "Parts the candidate could not keep up with",
            ["station"], registry=r,
        ).labels(**labels)
        self.outbox_depth = Gauge(
            "linesight_outbox_depth", "Messages waiting for the controller's receipt",
            ["station"], registry=r,
        ).labels(**labels)
        self.shadow_dropped = Gauge(
            "linesight_shadow_results_dropped",
            "Shadow results refused because the outbox was full, since the store was made",
            ["station"], registry=r,
        ).labels(**labels)
        self.review_depth = Gauge(
            "linesight_review_queue_depth", "Parts waiting for an operator", ["station"],
            registry=r,
        ).labels(**labels)
        self.faults = Gauge(
            "linesight_faults", "Active faults", ["station"], registry=r
        ).labels(**labels)
        self.fault_events = Counter(
            "linesight_fault_events", "Faults raised, by code", ["station", "code"], registry=r
        )
        self.frame_age = Gauge(
            "linesight_frame_age_seconds", "Age of the last frame when it was inspected",
            ["station"], registry=r,
        ).labels(**labels)
        self.source_reconnects = Gauge(
            "linesight_source_reconnects", "Times the live source reconnected", ["station"],
            registry=r,
        ).labels(**labels)
        # The source's own counters, brought up to date once a second (`record_source`).
        self.parts_missed = Counter(
            "linesight_parts_missed",
            "Parts the station did not inspect: triggers that got no frame, images and video "
            "frames that do not decode", ["station"], registry=r,
        ).labels(**labels)
        self.missed_triggers = Counter(
            "linesight_source_missed_triggers",
            "External triggers that got no frame in time, or whose frame was let go",
            ["station"], registry=r,
        ).labels(**labels)
        self.ignored_triggers = Counter(
            "linesight_source_ignored_triggers",
            "Triggers that came while the source's trigger mode is not external",
            ["station"], registry=r,
        ).labels(**labels)
        self.source_skipped = Counter(
            "linesight_source_skipped", "Folder images and video frames that do not decode",
            ["station"], registry=r,
        ).labels(**labels)
        self.frames_let_go = Counter(
            "linesight_source_frames_let_go",
            "Frames held for triggers let go to keep within held_frames_mb or 64 frames",
            ["station"], registry=r,
        ).labels(**labels)
        self.failed_reads = Counter(
            "linesight_source_failed_reads", "Live stream reads that gave no frame",
            ["station"], registry=r,
        ).labels(**labels)
        self.held_bytes = Gauge(
            "linesight_source_held_bytes", "Bytes of the frames held for external triggers",
            ["station"], registry=r,
        ).labels(**labels)
        self._source_seen = SourceLosses()
        self._source_lock = threading.Lock()
        self.disk_free = Gauge(
            "linesight_disk_free_bytes",
            "Free space on the data dir's file system (NaN until measured, or when it cannot be)",
            ["station"], registry=r,
        ).labels(**labels)
        self.disk_free.set(math.nan)
        self.drift = Gauge(
            "linesight_drift_psi", "Population stability index against the reference",
            ["station", "feature"], registry=r,
        )
        self.station = station
        # `labels()` takes a lock and builds a key on every call; the per-part metrics keep
        # their few children instead.
        self.decision_of = lru_cache(maxsize=64)(self._decision_child)
        self.latency_of = lru_cache(maxsize=8)(self._latency_child)
        self.confidence_of = lru_cache(maxsize=8)(self._confidence_child)

    def record_source(self, losses: SourceLosses) -> None:
        """Bring the source's counters up to date: each goes up by what the source counted
        since the last reading, so a loss is counted once however often this runs."""
        with self._source_lock:
            seen, self._source_seen = self._source_seen, losses
            for counter, now, before in (
                (self.parts_missed, losses.parts_missed, seen.parts_missed),
                (self.missed_triggers, losses.missed_triggers, seen.missed_triggers),
                (self.ignored_triggers, losses.ignored_triggers, seen.ignored_triggers),
                (self.source_skipped, losses.skipped, seen.skipped),
                (self.frames_let_go, losses.frames_let_go, seen.frames_let_go),
                (self.failed_reads, losses.failed_reads, seen.failed_reads),
            ):
                rise = counted_since(now, before)
                if rise:
                    counter.inc(rise)
            self.held_bytes.set(losses.held_bytes or 0)

    def _decision_child(self, action: str, decided_by: str) -> Any:
        return self.decisions.labels(self.station, action, decided_by)

    def _latency_child(self, slot: str) -> Any:
        return self.latency.labels(self.station, slot)

    def _confidence_child(self, slot: str) -> Any:
        return self.confidence.labels(self.station, slot)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)  # noqa: S104 - scraped
