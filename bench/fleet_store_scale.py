"""Does the fleet controller stay responsive for a plant? Its store's queries at plant scale.

Builds a fleet.db of realistic size (default 30 stations at 5 parts/s each, a decision and a
shadow result per part, three hours of them: 3.2 million messages, plus the operators' verdicts
on the disagreements), then times what the dashboard polls every two seconds
(`/api/stations`, `/api/series`, `/api/rollouts`, a stored rollout, a station's latest
decisions), and, while a simulated ingest thread stores a batch every 200 ms, the hourly
retention prune (the oldest hour) and an online backup: the longest an ingest batch waited for
the write lock is the figure that matters there. Each query's SQLite VM steps are counted with a
progress handler: a query whose steps grow with the table rather than with its window is a scan.

The stage's evidence and the series are kept as running totals (decision 0016): asked again with
nothing new, they cost next to nothing. "refresh" is what matters for them: a second of the
fleet's parts is stored, then each is asked, as the tick and a dashboard do; its time is put
beside the query over every row of the window (what each call cost before), in the same run.

The rows are made by the store's own row builder (`_Rows`) and inserted with the store's own
statements in large transactions, which is much faster than `ingest` one batch at a time;
`--check` first ingests a sample both ways and compares every table.

Run: .venv/bin/python -m bench.fleet_store_scale [--stations 30] [--rate 5] [--hours 3]
The last line printed is JSON for machines.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, print_json_line
from deploy.backup import back_up
from deploy.fleet_store import (
    _INSERT_DECISION,
    _INSERT_MESSAGE,
    _INSERT_SHADOW,
    _INSERT_VERDICT,
    SqliteFleetStore,
    _Rows,
    _series_points,
    _stations_param,
    paired_evidence_by_query,
    series_counts_by_query,
)
from linesight import protocol as p

ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
CANDIDATE = p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64)
DISAGREE_EVERY = 40  # 2.5% of the parts: the models disagree, an operator gives a verdict
REVIEW_EVERY = 25


def station_name(index: int) -> str:
    return f"press-{index:03d}"


def part_messages(station: str, part: int, seq: int, at: datetime) -> list[p.Envelope]:
    """A part's decision and shadow result (and a verdict on a disagreement), seqs from `seq`."""
    part_id = f"{station}-{part:09d}"
    disagree = part % DISAGREE_EVERY == 0
    action = p.Action.REVIEW if part % REVIEW_EVERY == 0 else p.Action.PASS
    out: list[p.Envelope] = [
        p.Decision(
            station=station, seq=seq, ts=at, part_id=part_id, decided_by=p.DecidedBy.ACTIVE,
            label="ok", confidence=0.97, action=action,
            review_reason=p.ReviewReason.LOW_CONFIDENCE if action == p.Action.REVIEW else None,
            model=ACTIVE, latency_ms=4.2, automation=p.AutomationLevel.PARTIAL,
            mode=p.DeploymentMode.SHADOW,
        ),
        p.ShadowResult(
            station=station, seq=seq + 1, ts=at, part_id=part_id, mode=p.DeploymentMode.SHADOW,
            active=p.ModelOpinion(model=ACTIVE, label="ok", confidence=0.97, latency_ms=4.2),
            candidate=p.ModelOpinion(model=CANDIDATE, label="defect" if disagree else "ok",
                                     confidence=0.91, latency_ms=6.8),
            agree=not disagree,
        ),
    ]
    if disagree:
        out.append(p.Verdict(
            station=station, seq=seq + 2, ts=at + timedelta(seconds=20), part_id=part_id,
            operator="1001", outcome=p.VerdictOutcome.PASS, label="ok",
            review_reason=p.ReviewReason.DISAGREEMENT, decided_at=at,
        ))
    return out


def traffic(stations: int, rate: float, start: datetime, seconds: float) -> Iterator[
        list[p.Envelope]]:
    """Every station's messages, a second at a time, in the order they would arrive."""
    parts = [0] * stations
    seqs = [0] * stations
    carry = [0.0] * stations
    for second in range(int(seconds)):
        batch: list[p.Envelope] = []
        for index in range(stations):
            carry[index] += rate
            while carry[index] >= 1:
                carry[index] -= 1
                at = start + timedelta(seconds=second + (parts[index] % 10) / 10)
                messages = part_messages(station_name(index), parts[index], seqs[index], at)
                parts[index] += 1
                seqs[index] += len(messages)
                batch.extend(messages)
        yield batch


def bulk_insert(store: SqliteFleetStore, messages: list[p.Envelope]) -> None:
    """Insert `messages` (new, contiguous per station, received when dated) as `ingest`
    would, in one transaction, and set each stream's watermark to its highest seq."""
    rows = _Rows()
    conn = store._conn()  # noqa: SLF001 - the bench builds the store's own rows
    conn.execute("BEGIN IMMEDIATE")
    row_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])
    marks: dict[str, int] = {}
    for message in messages:
        row_id += 1
        rows.add(row_id, message, round(message.ts.timestamp() * 1_000_000))
        marks[message.station] = max(marks.get(message.station, -1), message.seq)
    conn.executemany(_INSERT_MESSAGE, rows.messages)
    conn.executemany(_INSERT_DECISION, rows.decisions)
    conn.executemany(_INSERT_SHADOW, rows.shadows)
    conn.executemany(_INSERT_VERDICT, rows.verdicts)
    conn.executemany(
        "INSERT INTO streams (station, stream, watermark, max_seq) VALUES (?, '', ?, ?) "
        "ON CONFLICT DO UPDATE SET watermark = excluded.watermark, max_seq = excluded.max_seq",
        [(station, mark, mark) for station, mark in marks.items()],
    )
    conn.executemany("INSERT INTO stations (station) VALUES (?) ON CONFLICT DO NOTHING",
                     [(station,) for station in marks])
    conn.execute("COMMIT")


def table_rows(store: SqliteFleetStore) -> dict[str, list[tuple[Any, ...]]]:
    conn = store._conn()  # noqa: SLF001
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()  # noqa: S608
        for table in ("messages", "decisions", "shadows", "verdicts", "streams")
    }


def check_bulk_matches_ingest(folder: Path) -> None:
    """The bulk path stores exactly the rows `ingest` stores (received when dated)."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    sample = [m for batch in traffic(3, 5, start, 20) for m in batch]
    with SqliteFleetStore(folder / "ingest.db") as by_ingest, \
            SqliteFleetStore(folder / "bulk.db") as by_bulk:
        for message in sample:  # one at a time: each is received when it is dated
            by_ingest.ingest([message], received=message.ts)
        bulk_insert(by_bulk, sample)
        if table_rows(by_ingest) != table_rows(by_bulk):
            raise SystemExit("the bulk path does not store the rows ingest stores")
    print(f"bulk rows match ingest's for {len(sample)} messages")


def build(store: SqliteFleetStore, stations: int, rate: float, hours: float) -> int:
    end = datetime.now(UTC)
    start = end - timedelta(hours=hours)
    pending: list[p.Envelope] = []
    total = 0
    for batch in traffic(stations, rate, start, hours * 3600):
        pending.extend(batch)
        if len(pending) >= 50_000:
            bulk_insert(store, pending)
            total += len(pending)
            pending = []
    bulk_insert(store, pending)
    return total + len(pending)


def vm_steps(conn: sqlite3.Connection, call: Callable[[], object]) -> int:
    """SQLite VM instructions `call` ran on `conn`, in thousands."""
    counted = [0]

    def tick() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(tick, 1000)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 0)
    return counted[0]


def timed(call: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of `call`, in ms."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def stored_span(store: SqliteFleetStore) -> tuple[datetime, datetime]:
    """When the first and the last stored messages were received."""
    first, last = store._conn().execute(  # noqa: SLF001
        "SELECT min(received_us), max(received_us) FROM messages").fetchone()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + timedelta(microseconds=first), epoch + timedelta(microseconds=last)


def poll_queries(store: SqliteFleetStore, rollout_id: str) -> dict[str, Callable[[], object]]:
    """What the dashboard and the API ask, as of the last stored message (so that a fleet.db
    built earlier is asked about its own last half hour)."""
    now = stored_span(store)[1]
    names = [record.station for record in store.stations()]
    return {
        "stations": store.stations,
        "series_30min": lambda: store.evidence_series(names, now - timedelta(minutes=30), 30),
        "series_one_station": lambda: store.evidence_series(names[:1],
                                                            now - timedelta(minutes=30), 30),
        "rollouts": store.rollouts,
        "rollout": lambda: store.rollout(rollout_id),
        "latest_rollout": store.latest_rollout,
        "decisions_station_last_minute": lambda: store.decisions(
            names[0], now - timedelta(minutes=1), limit=100),
        "decisions_last_minute": lambda: store.decisions(since=now - timedelta(minutes=1),
                                                         limit=100),
        "decision_counts_last_hour": lambda: store.decision_counts(now - timedelta(hours=1)),
        "ack": lambda: store.ack(str(uuid.uuid4())),
        "paired_evidence_stage_1h": lambda: store.paired_evidence(
            names, now - timedelta(hours=1), CANDIDATE.sha256),
    }


def refresh_costs(store: SqliteFleetStore, stations: int, rate: float,
                  rounds: int = 7) -> dict[str, dict[str, float]]:
    """Median ms of the evidence of a stage an hour old and of the dashboard's 30-minute series
    right after a second of the fleet's parts was stored ("refresh"), of the first call (the
    totals built), and of the query over every row of the window ("whole_window")."""
    now = stored_span(store)[1]
    names = [record.station for record in store.stations()]
    since = now - timedelta(hours=1)
    plot_since = now - timedelta(minutes=30)
    key = (_stations_param(names), 30_000_000, None)
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "paired_evidence_stage_1h": (
            lambda: store.paired_evidence(names, since, CANDIDATE.sha256),
            lambda: paired_evidence_by_query(store._conn(), key[0], round(  # noqa: SLF001
                since.timestamp() * 1e6), CANDIDATE.sha256, "defect"),
        ),
        "series_30min": (
            lambda: store.evidence_series(names, plot_since, 30),
            lambda: _series_points(series_counts_by_query(
                store._conn(), key, round(plot_since.timestamp() * 1e6),  # noqa: SLF001
                round((datetime.now(UTC) + timedelta(seconds=30)).timestamp() * 1e6)), 30_000_000),
        ),
    }
    seqs = {name: store.contiguous(name) + 1 for name in names}
    part = 2 * 10**8 + int(time.time() * 1000) % 10**8
    result: dict[str, dict[str, float]] = {}
    for name, (kept, whole) in calls.items():
        store._stage_tallies.clear()  # noqa: SLF001 - the first call builds them, as at a start
        store._series_tallies.clear()  # noqa: SLF001
        started = time.perf_counter()
        kept()
        first_ms = (time.perf_counter() - started) * 1000
        refresh, scratch = [], []
        for _ in range(rounds):
            batch: list[p.Envelope] = []
            for _ in range(max(1, int(stations * rate))):  # a second of the fleet's parts
                station = station_name(part % stations)
                messages = part_messages(station, part, seqs[station], datetime.now(UTC))
                seqs[station] += len(messages)
                part += 1
                batch.extend(messages)
            store.ingest(batch)
            refresh.append(timed(kept, repeat=1))
            scratch.append(timed(whole, repeat=1))
        result[name] = {"first_ms": round(first_ms, 1),
                        "refresh_ms": round(statistics.median(refresh), 2),
                        "whole_window_ms": round(statistics.median(scratch), 1)}
        result[name]["ratio"] = round(result[name]["whole_window_ms"]
                                      / max(result[name]["refresh_ms"], 0.01), 1)
        print(f"{name:32s} refresh {result[name]['refresh_ms']:8.2f} ms, first call "
              f"{result[name]['first_ms']:8.1f} ms, whole window "
              f"{result[name]['whole_window_ms']:8.1f} ms: x{result[name]['ratio']}")
    return result


class IngestLoad:
    """Stores a batch of fresh messages every 200 ms on its own thread, as the controller's
    ingest thread does, and notes how long each `ingest` call took."""

    def __init__(self, store: SqliteFleetStore, stations: int, rate: float) -> None:
        self._store = store
        self._stations = stations
        self._rate = rate
        self._stop = threading.Event()
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IngestLoad:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Each station's stream goes on from what is stored, as a live station's would.
        seqs = {station_name(i): self._store.contiguous(station_name(i)) + 1
                for i in range(self._stations)}
        part = 10**8 + int(time.time() * 1000) % 10**8
        while not self._stop.wait(0.2):
            batch: list[p.Envelope] = []
            now = datetime.now(UTC)
            for _ in range(max(1, int(self._stations * self._rate * 0.2))):
                station = station_name(part % self._stations)
                messages = part_messages(station, part, seqs[station], now)
                seqs[station] += len(messages)
                part += 1
                batch.extend(messages)
            started = time.perf_counter()
            try:
                self._store.ingest(batch)
            except Exception:  # noqa: BLE001 - counted: the controller's batch would fail too
                self.failures += 1
            self.latencies_ms.append((time.perf_counter() - started) * 1000)

    def summary(self) -> dict[str, float]:
        values = sorted(self.latencies_ms) or [0.0]
        return {"batches": len(self.latencies_ms), "failed": self.failures,
                "median_ms": round(statistics.median(values), 1),
                "max_ms": round(values[-1], 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stations", type=int, default=30)
    parser.add_argument("--rate", type=float, default=5.0, help="parts/s per station")
    parser.add_argument("--hours", type=float, default=3.0, help="hours of traffic stored")
    parser.add_argument("--db", type=Path,
                        help="reuse (or build) this file, named fleet.db (the backup's name)")
    parser.add_argument("--check", action="store_true",
                        help="first check the bulk path stores what ingest stores")
    parser.add_argument("--no-prune", action="store_true")
    args = parser.parse_args(argv)
    if args.db is not None and args.db.name != "fleet.db":
        parser.error(f"--db: name the file fleet.db (a backup copies data_dir/fleet.db), not "
                     f"{args.db.name}")
    result: dict[str, Any] = {"machine": machine(), "stations": args.stations,
                              "parts_per_s": args.rate, "hours": args.hours}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.check:
            check_bulk_matches_ingest(folder)
        db = args.db or folder / "fleet.db"
        existed = db.exists()
        with SqliteFleetStore(db) as store:
            if not existed:
                started = time.monotonic()
                result["messages_built"] = build(store, args.stations, args.rate, args.hours)
                result["build_s"] = round(time.monotonic() - started, 1)
            conn = store._conn()  # noqa: SLF001
            result["messages"] = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
            result["db_mb"] = round(db.stat().st_size / 2**20)
            print(f"fleet.db: {result['messages']} messages, {result['db_mb']} MB")
            rollout_id = "r-bench"
            store.save_rollout(rollout_id, "observing", "{}", datetime.now(UTC))
            queries: dict[str, Any] = {}
            for name, call in poll_queries(store, rollout_id).items():
                queries[name] = {"ms": timed(call), "kvm_steps": vm_steps(conn, call)}
                print(f"{name:32s} {queries[name]['ms']:9.2f} ms "
                      f"{queries[name]['kvm_steps']:9d} k VM steps")
            result["queries"] = queries
            result["refresh"] = refresh_costs(store, args.stations, args.rate)
            if not args.no_prune:
                before = stored_span(store)[0] + timedelta(hours=1)  # the oldest hour
                with IngestLoad(store, args.stations, args.rate) as load:
                    time.sleep(1)
                    started = time.monotonic()
                    pruned = store.prune(before)
                    prune_s = time.monotonic() - started
                    time.sleep(1)
                result["prune"] = {"pruned": pruned, "seconds": round(prune_s, 1),
                                   "ingest_during": load.summary()}
                print(f"prune: {pruned} messages in {prune_s:.1f} s; ingest meanwhile "
                      f"{result['prune']['ingest_during']}")
            with IngestLoad(store, args.stations, args.rate) as load:
                time.sleep(1)
                made = back_up(db.parent, folder / "backup.db", datetime.now(UTC))
                time.sleep(1)
            result["backup"] = {"seconds": round(made.seconds, 1),
                                "mb": round(made.size_bytes / 2**20),
                                "ingest_during": load.summary()}
            print(f"backup: {result['backup']}")
    print_json_line(result)
    return result


if __name__ == "__main__":
    main()
