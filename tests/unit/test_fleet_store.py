"""The fleet controller's store: dedup by (station, seq), contiguity, evidence, inventory."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy import fleet_store
from deploy.fleet_store import (
    METRICS_HISTORY,
    FleetStore,
    FleetStoreError,
    SqliteFleetStore,
    StreamKey,
    _ReuseLog,
    offline_state,
)
from deploy.gates import PairedEvidence
from linesight import protocol as p
from linesight.sqlite_db import SqliteDatabase

T0 = datetime(2025, 3, 4, 6, 0, tzinfo=UTC)
ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="1.1.0", sha256="c" * 64)
OTHER = p.ModelRef(name="part-classifier", version="1.2.0", sha256="e" * 64)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteFleetStore]:
    with SqliteFleetStore(tmp_path / "fleet.db") as opened:
        yield opened


def decision(
    station: str,
    seq: int,
    *,
    at: datetime = T0,
    action: p.Action = p.Action.PASS,
    label: str | None = "ok",
    msg_id: uuid.UUID | None = None,
    stream: uuid.UUID | None = None,
) -> p.Decision:
    return p.Decision(
        station=station,
        seq=seq,
        stream=stream,
        ts=at,
        msg_id=msg_id or uuid.uuid4(),
        part_id=f"{station}-part-{seq}",
        decided_by=p.DecidedBy.ACTIVE,
        label=label,
        confidence=0.9,
        action=action,
        review_reason=p.ReviewReason.LOW_CONFIDENCE if action == p.Action.REVIEW else None,
        model=ACTIVE,
        latency_ms=3.0,
        automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.SHADOW,
    )


def shadow(
    station: str,
    seq: int,
    part_id: str,
    active: str | None,
    candidate: str | None,
    *,
    at: datetime = T0,
    model: p.ModelRef = CANDIDATE,
    latency_ms: float = 5.0,
) -> p.ShadowResult:
    return p.ShadowResult(
        station=station,
        seq=seq,
        ts=at,
        part_id=part_id,
        mode=p.DeploymentMode.SHADOW,
        active=p.ModelOpinion(model=ACTIVE, label=active, latency_ms=3.0),
        candidate=p.ModelOpinion(model=model, label=candidate, latency_ms=latency_ms),
        agree=active is not None and active == candidate,
    )


def verdict(
    station: str, seq: int, part_id: str, label: str | None, *, at: datetime = T0,
    outcome: p.VerdictOutcome | None = None,
) -> p.Verdict:
    outcome = outcome or {
        None: p.VerdictOutcome.ESCALATE, "defect": p.VerdictOutcome.REJECT
    }.get(label, p.VerdictOutcome.PASS)
    return p.Verdict(
        station=station,
        seq=seq,
        ts=at,
        part_id=part_id,
        operator="op-7",
        outcome=outcome,
        label=label,
        review_reason=p.ReviewReason.DISAGREEMENT,
        decided_at=at,
    )


def state(station: str, *, online: bool, line: str = "L1") -> p.StationState:
    return p.StationState(station=station, seq=0, online=online, labels={"line": line})


def metrics(station: str, at: datetime, parts: int = 10) -> p.StationMetrics:
    return p.StationMetrics(station=station, seq=0, ts=at, window_s=5.0, parts=parts)


# --- seq stream ------------------------------------------------------------------------------


def test_the_store_satisfies_the_interface(store: SqliteFleetStore) -> None:
    interface: FleetStore = store
    assert interface.contiguous("st-1") == -1


def test_duplicates_collapse_onto_the_first_copy(store: SqliteFleetStore) -> None:
    first = decision("st-1", 0, action=p.Action.PASS)
    assert store.ingest([first, decision("st-1", 1)]) == {StreamKey("st-1"): 1}
    assert store.ingest([first.model_copy(), first.model_copy()]) == {StreamKey("st-1"): 1}
    stored = store.decisions("st-1")
    assert [(d.seq, d.msg_id) for d in stored][:1] == [(0, first.msg_id)] and len(stored) == 2
    assert store.decision_counts(T0) == {"st-1": {"pass": 2}}


def test_a_seq_given_out_again_for_another_message_is_stored_beside_the_first(
    store: SqliteFleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A station whose store was restored from a backup numbers new messages with seqs it had
    used: its next receipt covers them and it deletes them, so dropping them would lose them."""
    old = [decision("st-1", seq) for seq in range(4)]
    assert store.ingest(old) == {StreamKey("st-1"): 3}
    again = [decision("st-1", seq, action=p.Action.REJECT, label="defect") for seq in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        assert store.ingest([again[0], old[3], again[1]]) == {StreamKey("st-1"): 3}
        assert store.ingest(again) == {StreamKey("st-1"): 3}, "a copy of one stored beside"
        twice = [decision("st-1", 4), decision("st-1", 4, action=p.Action.REVIEW)]
        assert store.ingest(twice) == {StreamKey("st-1"): 4}, "two for one new seq, one batch"
    stored = sorted((d.seq, str(d.msg_id)) for d in store.decisions("st-1"))
    expected = sorted((m.seq, str(m.msg_id)) for m in [*old, *again, *twice])
    assert stored == expected, "every message once, none dropped"
    assert store.decision_counts(T0) == {"st-1": {"pass": 5, "reject": 2, "review": 1}}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "at most one warning a minute per station"
    assert "gave out 2 seq(s) of stream '' again, between 1 and 2" in warnings[0]
    assert "restored from a backup" in warnings[0]


def test_seqs_given_out_again_after_a_warning_are_logged_a_minute_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reused = _ReuseLog()
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        reused.add("st-1", "a", [5, 6], now=100.0)  # the first: at once
        reused.add("st-1", "a", [7], now=110.0)
        reused.add("st-1", "b", [2], now=111.0)
        reused.add("st-2", "a", [9], now=112.0)  # another station has its own minute
        reused.flush(now=159.0)
        logged = [r.getMessage() for r in caplog.records]
        reused.flush(now=160.0)  # the minute after st-1's warning is over
        reused.flush(now=200.0)  # nothing left
    assert [m.split(" again")[0] for m in logged] == [
        "station st-1 gave out 2 seq(s) of stream 'a'",
        "station st-2 gave out 1 seq(s) of stream 'a'",
    ]
    assert [r.getMessage().split(" for other")[0] for r in caplog.records[2:]] == [
        "station st-1 gave out 1 seq(s) of stream 'a' again, between 7 and 7,",
        "station st-1 gave out 1 seq(s) of stream 'b' again, between 2 and 2,",
    ]


def test_every_ingest_logs_what_the_last_warnings_minute_held(
    store: SqliteFleetStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ReuseLog, "EVERY_S", 0.2)
    assert store.ingest([decision("st-1", seq) for seq in range(4)]) == {StreamKey("st-1"): 3}
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        store.ingest([decision("st-1", 1)])  # warned at once
        store.ingest([decision("st-1", 2)])  # within the minute: held
        assert len(caplog.records) == 1
        time.sleep(0.25)
        store.ingest([decision("st-2", 0)])  # another station's message, no seq re-used
    assert len(caplog.records) == 2
    assert "station st-1 gave out 1 seq(s) of stream '' again, between 2 and 2" in (
        caplog.records[1].getMessage())


def test_a_late_copy_of_a_seq_pruned_by_age_is_not_stored_again(
    store: SqliteFleetStore,
) -> None:
    first = decision("st-1", 0)
    assert store.ingest([first], received=T0) == {StreamKey("st-1"): 0}
    assert store.prune(T0 + timedelta(seconds=1)) == 1
    assert store.ingest([first.model_copy()]) == {StreamKey("st-1"): 0}
    assert store.decisions("st-1") == []


def test_contiguity_waits_for_the_gap_then_jumps_over_stored_seqs(
    store: SqliteFleetStore,
) -> None:
    assert store.ingest([decision("st-1", 1), decision("st-1", 2)]) == {StreamKey("st-1"): -1}
    assert store.ingest([decision("st-2", 0), decision("st-1", 4)]) == {
        StreamKey("st-1"): -1, StreamKey("st-2"): 0
    }
    assert store.ingest([decision("st-1", 0)]) == {StreamKey("st-1"): 2}
    assert store.ingest([decision("st-1", 3)]) == {StreamKey("st-1"): 4}
    assert store.contiguous("st-1") == 4
    assert store.contiguous("st-2") == 0
    assert store.contiguous("st-unknown") == -1


def test_each_seq_stream_of_a_station_is_stored_with_its_own_watermark(
    store: SqliteFleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A station whose storage was replaced numbers from 0 again, in a new stream."""
    old, new = uuid.uuid4(), uuid.uuid4()
    unnamed = [decision("st-1", seq) for seq in range(3)]  # a store from before streams
    before = [decision("st-1", seq, stream=old) for seq in range(5)]
    after = [decision("st-1", seq, stream=new) for seq in range(2)]
    assert store.ingest([*unnamed, *before]) == {
        StreamKey("st-1"): 2, StreamKey("st-1", old): 4
    }
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        assert store.ingest(after) == {StreamKey("st-1", new): 1}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"started a new seq stream '{new}' beside 2 earlier" in said[0]
    assert (store.contiguous("st-1"), store.contiguous("st-1", old)) == (2, 4)
    assert store.contiguous("st-1", new) == 1
    assert len(store.decisions("st-1")) == 10, "seq 0 and 1 of the new stream are not copies"
    # Within a stream, a copy still collapses onto the first.
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        assert store.ingest([after[1].model_copy(), before[4]]) == {
            StreamKey("st-1", new): 1, StreamKey("st-1", old): 4
        }
    assert len(caplog.records) == 1, "a new stream is said once, not with every batch"
    assert len(store.decisions("st-1")) == 10
    assert [record.station for record in store.stations()] == ["st-1"]
    # Pruning goes by each stream's own watermark.
    gap = decision("st-1", 9, stream=new)  # above a gap: not receipted, so never pruned
    store.ingest([gap])
    assert store.prune(datetime.now(UTC) + timedelta(days=1)) == 10  # all received today
    assert [(d.stream, d.seq) for d in store.decisions("st-1")] == [(new, 9)]


def test_a_stream_resumes_from_what_the_station_says_was_receipted(
    store: SqliteFleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that lost messages it had receipted (a restore, a new disk) would wait for them
    for ever: the station never sends them again."""
    kept, lost = uuid.uuid4(), uuid.uuid4()
    store.ingest([decision("st-1", seq, stream=kept) for seq in range(5)])
    assert store.resume(StreamKey("st-1", kept), 3) is None, "below the watermark: no news"
    assert store.resume(StreamKey("st-1", kept), -1) is None
    # After the loss this store holds only what came since: 10, 11 and 13.
    arrived = [decision("st-1", seq, stream=lost) for seq in (10, 11, 13)]
    assert store.ingest(arrived) == {StreamKey("st-1", lost): -1}
    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        assert store.resume(StreamKey("st-1", lost), 9) == 11, "and on over 10 and 11"
    assert "seqs 0 to 9 were receipted earlier but are not in this store" in caplog.text
    assert store.contiguous("st-1", lost) == 11
    assert store.resume(StreamKey("st-1", lost), 9) is None
    assert store.ingest([decision("st-1", 12, stream=lost)]) == {StreamKey("st-1", lost): 13}
    # A stream this store never heard of starts where the station says.
    assert store.resume(StreamKey("st-2", lost), 40) == 40
    assert store.ingest([decision("st-2", 41, stream=lost)]) == {StreamKey("st-2", lost): 41}
    assert {record.station for record in store.stations()} == {"st-1", "st-2"}


def test_a_store_from_before_seq_streams_keeps_its_watermarks(tmp_path: Path) -> None:
    """Schema 2 kept one watermark per station; schema 3 keeps it as the unnamed stream's."""
    path = tmp_path / "fleet.db"
    old = SqliteDatabase(path, synchronous="NORMAL", busy_timeout_s=5.0)
    old.migrate(fleet_store._MIGRATIONS[:2])
    with old.write() as conn:
        conn.execute(
            "INSERT INTO stations (station, watermark, max_seq, online) VALUES ('st-1', 4, 6, 1)"
        )
        conn.executemany(
            "INSERT INTO messages (station, seq, kind, msg_id, ts_us, payload) "
            "VALUES ('st-1', ?, 'decision', ?, 0, '{}')",
            [(seq, str(uuid.uuid4())) for seq in (0, 1, 2, 3, 4, 6)],
        )
    old.close()
    with SqliteFleetStore(path) as store:
        assert store.schema_version() == fleet_store.SCHEMA_VERSION == 7
        assert store.contiguous("st-1") == 4
        assert store.ingest([decision("st-1", 3)]) == {StreamKey("st-1"): 4}, "a copy"
        assert store.ingest([decision("st-1", 5)]) == {StreamKey("st-1"): 6}
        fresh = uuid.uuid4()  # its storage replaced after the upgrade
        assert store.ingest([decision("st-1", 0, stream=fresh)]) == {StreamKey("st-1", fresh): 0}
        assert [record.station for record in store.stations()] == ["st-1"]


def test_metrics_and_state_are_not_part_of_the_seq_stream(store: SqliteFleetStore) -> None:
    assert store.ingest([metrics("st-1", T0), state("st-1", online=True)]) == {}
    assert store.contiguous("st-1") == -1
    with pytest.raises(ValueError, match="Receipt"):
        store.ingest([p.Receipt(station="st-1", seq=0, upto_seq=3)])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), n=st.integers(min_value=0, max_value=40))
def test_any_arrival_order_reaches_the_full_prefix_and_never_overshoots(
    tmp_path: Path, data: st.DataObject, n: int
) -> None:
    seqs = list(range(n + 1))
    extra = data.draw(st.lists(st.sampled_from(seqs), max_size=n + 1), label="duplicates")
    arrival = data.draw(st.permutations(seqs + extra), label="arrival")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(arrival)), max_size=6), label="cuts"))
    path = tmp_path / f"fleet-{uuid.uuid4().hex}.db"
    with SqliteFleetStore(path) as fleet:
        arrived: set[int] = set()
        for start, end in zip([0, *cuts], [*cuts, len(arrival)], strict=True):
            batch = arrival[start:end]
            if not batch:
                continue
            reported = fleet.ingest([decision("st-1", seq) for seq in batch])[StreamKey("st-1")]
            arrived.update(batch)
            prefix = -1
            while prefix + 1 in arrived:
                prefix += 1
            assert reported == prefix
        assert fleet.contiguous("st-1") == n


def test_ten_thousand_messages_from_many_stations(store: SqliteFleetStore) -> None:
    batch: list[p.Envelope] = []
    for i in range(10_000):
        station = f"st-{i % 50:02d}"
        seq = i // 50
        at = T0 + timedelta(milliseconds=i)
        if seq % 2:
            batch.append(shadow(station, seq, f"{station}-{seq}", "ok", "ok", at=at))
        else:
            batch.append(decision(station, seq, at=at))
    for start in range(0, len(batch), 500):
        store.ingest(batch[start : start + 500])
    assert {store.contiguous(f"st-{s:02d}") for s in range(50)} == {199}
    assert len(store.decisions()) == 5_000


def test_ingest_from_several_threads(store: SqliteFleetStore) -> None:
    def feed(station: str) -> None:
        for seq in range(0, 200, 20):
            store.ingest([decision(station, s) for s in range(seq, seq + 20)])

    threads = [threading.Thread(target=feed, args=(f"st-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [store.contiguous(f"st-{i}") for i in range(4)] == [199] * 4


# --- evidence --------------------------------------------------------------------------------


def paired_fixture(store: SqliteFleetStore) -> None:
    """Station a: 10 pairs since T0; station b: 2 pairs; plus rows every query must ignore."""
    a = [
        shadow("a", 0, "p0", "ok", "ok", latency_ms=1.0),
        shadow("a", 1, "p1", "ok", "ok", latency_ms=2.0),
        shadow("a", 2, "p2", "ok", "ok", latency_ms=3.0),
        shadow("a", 3, "p3", "ok", "ok", latency_ms=4.0),
        shadow("a", 4, "p4", "ok", "defect", latency_ms=5.0),  # candidate right (defect)
        shadow("a", 5, "p5", "defect", "ok", latency_ms=6.0),  # candidate wrong (escape)
        shadow("a", 6, "p6", "defect", "ok", latency_ms=7.0),  # escalated: not labelled
        shadow("a", 7, "p7", "ok", "defect", latency_ms=8.0),  # candidate wrong (ok part)
        shadow("a", 8, "p8", "ok", "defect", latency_ms=9.0),  # unlabelled
        shadow("a", 9, "p9", None, "ok", latency_ms=100.0),  # active failed: not a pair
        verdict("a", 10, "p4", "defect"),
        verdict("a", 11, "p5", "defect"),
        verdict("a", 12, "p6", None),
        verdict("a", 13, "p7", "ok"),
        verdict("a", 14, "p0", "ok"),  # an audit of an agreement: not a disagreement
        shadow("a", 15, "p10", "ok", "defect", model=OTHER),  # another candidate
        verdict("a", 17, "p11", "ok"),
    ]
    # Received before `since` (whatever its ts says): not the stage's.
    store.ingest([shadow("a", 16, "p11", "ok", "defect")], received=T0 - timedelta(seconds=1))
    b = [
        shadow("b", 0, "q0", "defect", "ok", latency_ms=10.0),
        verdict("b", 1, "q0", "defect"),
        verdict("b", 2, "q0", None),  # a later escalation does not hide the label
        shadow("b", 3, "q1", "ok", "ok", latency_ms=11.0),
        verdict("b", 4, "p4", "ok"),  # same part id on another station: not a's verdict
    ]
    c = [shadow("c", 0, "r0", "ok", "defect"), verdict("c", 1, "r0", "defect")]  # not asked
    store.ingest([*a, *b, *c], received=T0)


def test_paired_evidence_counts(store: SqliteFleetStore) -> None:
    paired_fixture(store)
    evidence = store.paired_evidence(["a", "b"], T0, CANDIDATE.sha256)
    # pairs: a p0-p8 (9) + b q0, q1 (2); disagreements: p4-p8 (5) + q0; labelled: p4 p5 p7 q0.
    assert evidence.overall == PairedEvidence(
        parts=11, disagreements=6, labelled_disagreements=4, candidate_right=1
    )
    # labelled defects p4 (right), p5, q0; 2 unlabelled * 3 defects / 4 labelled = 1.5 -> 2.
    assert evidence.escapes == PairedEvidence(
        parts=11, disagreements=5, labelled_disagreements=3, candidate_right=1
    )
    # 12 candidate results (p9 included): nearest-rank p95 is the 12th slowest of 12.
    assert evidence.p95_latency_ms == 100.0


def test_paired_evidence_filters_station_since_and_candidate(store: SqliteFleetStore) -> None:
    paired_fixture(store)
    only_b = store.paired_evidence(["b"], T0, CANDIDATE.sha256)
    assert only_b.overall == PairedEvidence(2, 1, 1, 0)
    assert only_b.p95_latency_ms == 11.0
    later = store.paired_evidence(["a", "b"], T0 + timedelta(seconds=1), CANDIDATE.sha256)
    assert later.overall == PairedEvidence(0, 0, 0, 0)
    assert later.escapes == PairedEvidence(0, 0, 0, 0)
    assert later.p95_latency_ms is None
    other = store.paired_evidence(["a"], T0, OTHER.sha256)
    assert other.overall == PairedEvidence(1, 1, 0, 0)
    assert store.paired_evidence([], T0, CANDIDATE.sha256).overall.parts == 0


def test_escapes_with_a_custom_defect_label(store: SqliteFleetStore) -> None:
    reject = p.VerdictOutcome.REJECT
    store.ingest(
        [
            shadow("a", 0, "p0", "ok", "scratch"),
            shadow("a", 1, "p1", "scratch", "ok"),
            verdict("a", 2, "p0", "scratch", outcome=reject),
            verdict("a", 3, "p1", "scratch", outcome=reject),
        ]
    )
    evidence = store.paired_evidence(["a"], T0, CANDIDATE.sha256, defect_label="scratch")
    assert evidence.escapes == PairedEvidence(2, 2, 2, 1)
    # Told the wrong defect label, the store takes the candidate's "scratch" for a pass.
    assert store.paired_evidence(["a"], T0, CANDIDATE.sha256).escapes == PairedEvidence(2, 2, 2, 0)


def test_the_truth_is_the_verdicts_outcome_whatever_words_the_screen_uses(
    store: SqliteFleetStore,
) -> None:
    """The station screen says ok/defect; a good/ng model is judged by pass and reject."""
    store.ingest(
        [
            shadow("a", 0, "p0", "good", "ng"),  # a defect: the candidate catches it
            shadow("a", 1, "p1", "ng", "good"),  # a defect: the candidate lets it pass
            shadow("a", 2, "p2", "ng", "good"),  # a good part: the candidate is right
            shadow("a", 3, "p3", "good", "ng"),  # unlabelled
            verdict("a", 4, "p0", "defect"),
            verdict("a", 5, "p1", "defect"),
            verdict("a", 6, "p2", "ok"),
        ]
    )
    evidence = store.paired_evidence(["a"], T0, CANDIDATE.sha256, defect_label="ng")
    assert evidence.overall == PairedEvidence(4, 4, 3, 2)
    assert evidence.escapes == PairedEvidence(4, 3, 2, 1)  # 2 of 3 labelled were defects
    assert evidence.possible_escapes == 3  # the 2 labelled defects and the unlabelled one


def test_evidence_series_buckets(store: SqliteFleetStore) -> None:
    store.ingest(
        [
            decision("a", 0, at=T0 + timedelta(seconds=1)),
            decision("a", 1, at=T0 + timedelta(seconds=2), action=p.Action.REJECT),
            decision("b", 0, at=T0 + timedelta(seconds=3)),
            decision("a", 2, at=T0 + timedelta(seconds=25), action=p.Action.REVIEW, label=None),
            decision("c", 0, at=T0 + timedelta(seconds=12)),  # not asked for
            shadow("a", 3, "x", "ok", "ok", at=T0 + timedelta(seconds=4)),
            shadow("a", 4, "y", "ok", "defect", at=T0 + timedelta(seconds=5)),
            shadow("a", 5, "z", "ok", "ok", at=T0 + timedelta(seconds=26), model=OTHER),
        ]
    )
    points = store.evidence_series(["a", "b"], T0, 10)
    assert [point.start for point in points] == [T0 + timedelta(seconds=s) for s in (0, 10, 20)]
    assert [point.parts for point in points] == [3, 0, 1]
    assert points[0].actions == {"pass": 2, "reject": 1}
    assert points[2].actions == {"review": 1}
    assert [point.shadow_pairs for point in points] == [2, 0, 1]
    assert [point.agreement_rate for point in points] == [0.5, None, 1.0]
    with_candidate = store.evidence_series(["a", "b"], T0, 10, CANDIDATE.sha256)
    assert [point.shadow_pairs for point in with_candidate] == [2, 0, 0]
    assert store.evidence_series(["a"], T0 + timedelta(minutes=5), 10) == []


def test_evidence_series_ends_at_until(store: SqliteFleetStore) -> None:
    """A station whose clock runs a year ahead: its messages stay out of the series, which
    covers [since, until) only, instead of zero-filling a bucket per 10 s up to next year."""
    ahead = T0 + timedelta(days=365)
    store.ingest([
        decision("a", 0, at=T0 + timedelta(seconds=1)),
        decision("a", 1, at=ahead),
        shadow("a", 2, "x", "ok", "ok", at=T0 + timedelta(seconds=2)),
        shadow("a", 3, "y", "ok", "ok", at=ahead),
    ])
    until = T0 + timedelta(minutes=1)
    for candidate in (None, CANDIDATE.sha256):
        points = store.evidence_series(["a"], T0, 10, candidate, until=until)
        assert [point.start for point in points] == [T0]
        assert (points[0].parts, points[0].shadow_pairs) == (1, 1)
    later = store.evidence_series(["a"], ahead, 10, until=ahead + timedelta(seconds=10))
    assert [(point.start, point.parts) for point in later] == [(ahead, 1)], "kept, not lost"


def test_evidence_series_ends_one_bucket_past_now_by_default(store: SqliteFleetStore) -> None:
    now = datetime.now(UTC)
    store.ingest([decision("a", 0, at=now), decision("a", 1, at=now + timedelta(days=30))])
    points = store.evidence_series(["a"], now - timedelta(minutes=30), 30)
    assert 1 <= len(points) <= 2 and sum(point.parts for point in points) == 1


def test_decision_counts_since(store: SqliteFleetStore) -> None:
    store.ingest(
        [
            decision("a", 0, at=T0 - timedelta(minutes=1)),
            decision("a", 1, action=p.Action.REJECT),
            decision("a", 2),
            decision("b", 0, action=p.Action.REVIEW),
        ]
    )
    assert store.decision_counts(T0) == {"a": {"reject": 1, "pass": 1}, "b": {"review": 1}}


def test_ack_is_found_by_cmd_id(store: SqliteFleetStore) -> None:
    cmd_id = uuid.uuid4()
    assert store.ack(str(cmd_id)) is None
    store.ingest(
        [p.CommandAck(station="a", seq=0, cmd_id=cmd_id, command="set_mode", ok=False, error="x")]
    )
    ack = store.ack(str(cmd_id))
    assert ack is not None and ack.ok is False and ack.error == "x" and ack.command == "set_mode"


def test_decisions_filter_by_station_and_since(store: SqliteFleetStore) -> None:
    store.ingest(
        [
            decision("a", 0, at=T0),
            decision("b", 0, at=T0 + timedelta(seconds=1)),
            decision("a", 1, at=T0 + timedelta(seconds=2)),
        ]
    )
    assert [(d.station, d.seq) for d in store.decisions()] == [("a", 0), ("b", 0), ("a", 1)]
    assert [d.seq for d in store.decisions("a", since=T0 + timedelta(seconds=1))] == [1]
    assert len(store.decisions(limit=2)) == 2


# --- inventory -------------------------------------------------------------------------------


def test_state_inventory_online_offline_and_last_seen(store: SqliteFleetStore) -> None:
    store.record_state(state("a", online=True, line="L2"), T0)
    store.record_state(state("b", online=False), T0)
    store.ingest([decision("c", 0), metrics("c", T0)])  # heard of only by its messages
    store.record_state(state("a", online=False, line="L2"), T0 + timedelta(minutes=5))

    records = {record.station: record for record in store.stations()}
    assert list(records) == ["a", "b", "c"]
    assert records["a"].online is False
    assert records["a"].last_seen == T0  # a Last Will does not move last_seen
    assert records["a"].labels == {"line": "L2"}
    assert records["a"].state is not None and records["a"].state.online is False
    assert records["b"].last_seen is None
    assert records["c"].state is None and records["c"].online is False
    assert records["c"].latest_metrics is not None

    store.record_state(state("a", online=True), T0 + timedelta(minutes=7))
    again = {record.station: record for record in store.stations()}["a"]
    assert again.online is True and again.last_seen == T0 + timedelta(minutes=7)


S1 = uuid.UUID("00000000-0000-4000-8000-000000000001")


def test_a_last_will_composed_before_a_promotion_keeps_the_promoted_models(
    store: SqliteFleetStore,
) -> None:
    v1 = p.ModelRef(name="m", version="1.0.0", sha256="1" * 64)
    v2 = p.ModelRef(name="m", version="2.0.0", sha256="2" * 64)
    # The Will is composed at connect (seq 3, running 1.0.0 with 2.0.0 on trial); the station
    # then promotes 2.0.0 and says so (seq 9), and dies: the broker publishes the Will.
    will = p.StationState(station="a", seq=3, stream=S1, online=False, active=v1,
                          candidate=v2, mode=p.DeploymentMode.SHADOW)
    store.record_state(p.StationState(station="a", seq=9, stream=S1, online=True,
                                      active=v2, previous=v1), T0)
    store.record_state(will, T0 + timedelta(minutes=1))
    [record] = store.stations()
    assert record.online is False and record.state is not None
    assert (record.state.online, record.state.active, record.state.candidate) == (False, v2, None)
    assert record.last_seen == T0

    # A Will from a new seq stream (its storage was replaced) is newer than anything stored.
    replaced = will.model_copy(update={"stream": uuid.uuid4()})
    store.record_state(replaced, T0 + timedelta(minutes=2))
    [record] = store.stations()
    assert record.state is not None and record.state.active == v1 and not record.state.online


def test_an_offline_report_at_least_as_new_as_the_state_stored_replaces_it() -> None:
    ref = p.ModelRef(name="m", version="1.0.0", sha256="1" * 64)
    online = p.StationState(station="a", seq=5, stream=S1, online=True)
    stopped = p.StationState(station="a", seq=6, stream=S1, online=False, active=ref)
    assert offline_state(online, stopped) is stopped  # a clean stop says what it ran last
    assert offline_state(None, stopped) is stopped
    older = stopped.model_copy(update={"seq": 4})
    assert offline_state(online, older) == online.model_copy(update={"online": False})


def test_latest_metrics_and_bounded_history(store: SqliteFleetStore) -> None:
    reports = [
        metrics("a", T0 + timedelta(seconds=5 * i), parts=i) for i in range(METRICS_HISTORY + 5)
    ]
    for start in range(0, len(reports), 100):
        store.ingest(reports[start : start + 100])
    store.ingest([metrics("a", T0, parts=999)])  # late: joins history, does not become latest
    latest = store.stations()[0].latest_metrics
    assert latest is not None and latest.parts == METRICS_HISTORY + 4
    history = store.metrics_history("a")
    assert len(history) == METRICS_HISTORY
    assert history[-1].parts == METRICS_HISTORY + 4
    assert len(store.metrics_history("a", since=reports[-3].ts)) == 3


def overwrite_row(
    path: Path, station: str, *, state: dict[str, object] | None = None,
    metrics: dict[str, object] | None = None,
) -> None:
    """Put documents into a station's row directly, as an older controller may have left it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        if state is not None:
            conn.execute("UPDATE stations SET state_json = ? WHERE station = ?",
                         (json.dumps(state), station))
        if metrics is not None:
            conn.execute("UPDATE stations SET metrics_json = ? WHERE station = ?",
                         (json.dumps(metrics), station))
        conn.commit()


def with_infinity_as_null(document: p.Envelope) -> dict[str, object]:
    """The message as an older controller stored it with one infinite number in it."""
    stored: dict[str, object] = json.loads(document.model_dump_json(by_alias=True))
    if isinstance(document, p.StationState):
        stored["drift"] = {"psi_brightness": None, "psi_contrast": 0, "psi_sharpness": 0,
                           "psi_confidence": 0, "window_parts": 100, "drifting": True}
    else:
        stored["latency"] = {"active": {"p50_ms": 1, "p95_ms": None, "p99_ms": 1, "count": 5}}
    return stored


def test_a_stored_row_that_no_longer_validates_spares_the_rest_of_the_fleet(
    store: SqliteFleetStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A station whose stored state cannot be read is left out (nothing can be said of its
    faults); one whose latest metrics cannot be read is listed without them. Each is logged
    once, not on every read of the inventory."""
    for name in ("a", "b", "c"):
        store.record_state(state(name, online=True), T0)
    store.ingest([metrics("c", T0)])
    overwrite_row(store.path, "a", state=with_infinity_as_null(state("a", online=True)))
    overwrite_row(store.path, "c", metrics=with_infinity_as_null(metrics("c", T0)))

    with caplog.at_level(logging.WARNING, logger="deploy.fleet_store"):
        for _ in range(3):
            records = {record.station: record for record in store.stations()}
            assert list(records) == ["b", "c"]
            assert records["c"].state is not None and records["c"].latest_metrics is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings
    assert "station a: its stored state cannot be read" in warnings[0]
    assert "station c: its stored latest metrics cannot be read" in warnings[1]

    store.record_state(state("a", online=True), T0 + timedelta(seconds=5))  # it reports again
    store.ingest([metrics("c", T0 + timedelta(seconds=5))])
    records = {record.station: record for record in store.stations()}
    assert list(records) == ["a", "b", "c"] and records["c"].latest_metrics is not None


# --- rollouts and the controller's seq -------------------------------------------------------


def test_rollout_save_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with SqliteFleetStore(path) as fleet:
        fleet.save_rollout("r1", "promoted", json.dumps({"id": "r1"}), T0)
        fleet.save_rollout("r2", "running", json.dumps({"id": "r2", "stage": 0}), T0)
        fleet.save_rollout("r2", "waiting_approval", json.dumps({"id": "r2", "stage": 1}), T0)
        assert fleet.active_rollout() == ("r2", json.dumps({"id": "r2", "stage": 1}))
    with SqliteFleetStore(path) as fleet:
        assert fleet.active_rollout() == ("r2", json.dumps({"id": "r2", "stage": 1}))
        fleet.save_rollout("r2", "rolled_back", "{}", T0 + timedelta(minutes=1))
        assert fleet.active_rollout() is None
        assert fleet.rollout("r1") == json.dumps({"id": "r1"})
        assert fleet.rollout("nope") is None
        assert fleet.rollouts() == [
            ("r2", "rolled_back", T0 + timedelta(minutes=1)),
            ("r1", "promoted", T0),
        ]
        assert fleet.rollouts(limit=1) == [("r2", "rolled_back", T0 + timedelta(minutes=1))]


def test_the_latest_rollout_whatever_its_phase(store: SqliteFleetStore) -> None:
    assert store.latest_rollout() is None
    store.save_rollout("r1", "promoted", json.dumps({"id": "r1"}), T0)
    assert store.latest_rollout() == ("r1", json.dumps({"id": "r1"}))
    store.save_rollout("r2", "aborted", json.dumps({"id": "r2"}), T0 + timedelta(minutes=1))
    assert store.latest_rollout() == ("r2", json.dumps({"id": "r2"}))
    assert store.active_rollout() is None


def test_a_rollout_keeps_its_defect_label(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with SqliteFleetStore(path) as fleet:
        fleet.save_rollout("r1", "running", "{}", T0, defect_label="ng")
        fleet.save_rollout("r1", "promoted", "{}", T0 + timedelta(minutes=1))
        fleet.save_rollout("r2", "running", "{}", T0)
    with SqliteFleetStore(path) as fleet:
        assert fleet.rollout_defect_label("r1") == "ng"
        assert fleet.rollout_defect_label("r2") is None
        assert fleet.rollout_defect_label("nope") is None


def test_a_rollout_from_before_schema_4_has_no_defect_label(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    old = SqliteDatabase(path, synchronous="NORMAL", busy_timeout_s=5.0)
    old.migrate(fleet_store._MIGRATIONS[:3])
    with old.write() as conn:
        conn.execute(
            "INSERT INTO rollouts (rollout_id, phase, state_json, updated_us) "
            "VALUES ('r1', 'running', '{}', 0)"
        )
    old.close()
    with SqliteFleetStore(path) as fleet:
        assert fleet.schema_version() == fleet_store.SCHEMA_VERSION
        assert fleet.active_rollout() == ("r1", "{}")
        assert fleet.rollout_defect_label("r1") is None


def test_next_seq_is_monotonic_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with SqliteFleetStore(path) as fleet:
        first = [fleet.next_seq() for _ in range(5)]
    assert first == sorted(set(first))
    with SqliteFleetStore(path) as fleet:
        after = fleet.next_seq()
    assert after > first[-1]


def test_the_store_refuses_use_after_close(tmp_path: Path) -> None:
    fleet = SqliteFleetStore(tmp_path / "fleet.db")
    fleet.close()
    with pytest.raises(FleetStoreError, match="closed"):
        fleet.contiguous("a")


def test_retention_prunes_only_old_receipted_messages(store: SqliteFleetStore) -> None:
    old, new = T0 - timedelta(days=40), T0
    # seq 0-4 old and contiguous; seq 6 old but above a gap (5 missing); seq 7 new.
    store.ingest([decision("a", seq, at=old) for seq in (0, 1, 2, 3, 4, 6)], received=old)
    store.ingest([decision("a", 7, at=new)], received=new)
    assert store.contiguous("a") == 4
    assert store.prune(T0 - timedelta(days=30)) == 5
    left = [d.seq for d in store.decisions("a")]
    assert left == [6, 7], "a message above a gap is kept until the gap is filled"
    # A late copy of a pruned message is a duplicate, not a new message.
    assert store.ingest([decision("a", 2, at=old)], received=new) == {StreamKey("a"): 4}
    assert [d.seq for d in store.decisions("a")] == [6, 7]
    # The gap closes: contiguity still jumps over what was stored above it.
    assert store.ingest([decision("a", 5, at=new)], received=new) == {StreamKey("a"): 7}
    assert store.prune(T0 - timedelta(days=30)) == 1  # seq 6, now receipted
    assert store.prune(T0 - timedelta(days=30)) == 0


def test_retention_counts_from_receipt_not_from_the_stations_clock(
    store: SqliteFleetStore,
) -> None:
    """A station whose clock runs years behind deleted its copies on their receipts: the
    controller's are kept for the full retention from when they arrived."""
    store.ingest([decision("a", 0, at=datetime(2000, 1, 1, tzinfo=UTC))], received=T0)
    assert store.prune(T0 - timedelta(days=30)) == 0
    assert [d.seq for d in store.decisions("a")] == [0]
    assert store.prune(T0 + timedelta(days=31)) == 1


def test_an_ingest_commit_is_on_disk_before_its_receipts_go_out(
    store: SqliteFleetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the receipt the station deletes its copy: a power cut must not take the commit
    back, so ingest commits are fsynced (synchronous=FULL), unlike the rest."""
    asked: list[str | None] = []
    write = store._db.write

    def recording(*, synchronous: str | None = None) -> Any:
        asked.append(synchronous)
        return write(synchronous=synchronous)  # type: ignore[arg-type]

    monkeypatch.setattr(store._db, "write", recording)
    store.ingest([decision("a", 0), shadow("a", 1, "p1", "ok", "ok")])
    assert asked == ["FULL"]


def test_a_store_from_schema_5_keeps_its_messages_and_stores_a_reused_seq_beside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fleet.db"
    old = SqliteDatabase(path, synchronous="NORMAL", busy_timeout_s=5.0)
    old.migrate(fleet_store._MIGRATIONS[:5])
    first = decision("st-1", 0)
    with old.write() as conn:
        conn.execute(
            "INSERT INTO messages (station, seq, kind, msg_id, ts_us, payload, received_us) "
            "VALUES ('st-1', 0, 'decision', ?, 0, '{}', 0)", (str(first.msg_id),),
        )  # fmt: skip
        conn.execute("INSERT INTO streams (station, stream, watermark, max_seq) "
                     "VALUES ('st-1', '', 0, 0)")  # fmt: skip
    old.close()
    with SqliteFleetStore(path) as fleet:
        assert fleet.schema_version() == fleet_store.SCHEMA_VERSION
        assert fleet.ingest([first.model_copy(), decision("st-1", 0)]) == {StreamKey("st-1"): 0}
        assert fleet.ingest([decision("st-1", 1)]) == {StreamKey("st-1"): 1}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE seq = 0").fetchone()[0] == 2
