"""Prometheus metrics of one station, in a registry of its own (several agents may share a
process in tests and simulations)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000)
_CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


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

    def _decision_child(self, action: str, decided_by: str) -> Any:
        return self.decisions.labels(self.station, action, decided_by)

    def _latency_child(self, slot: str) -> Any:
        return self.latency.labels(self.station, slot)

    def _confidence_child(self, slot: str) -> Any:
        return self.confidence.labels(self.station, slot)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)  # noqa: S104 - scraped
