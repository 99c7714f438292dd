"""Does the fleet controller keep up with a fleet? Ingest rate and publish-to-receipt lag.

Simulated stations (a few publisher processes, each owning a slice of the station ids) publish
pre-serialised Decision and ShadowResult messages with contiguous seqs, QoS 1, at a fixed total
rate (default 1,000 stations x 2 msg/s), through a real Mosquitto started with the settings of
deploy/mosquitto.conf. Two runs on the same load:

  raw         a plain subscriber that only counts (and notes when each message arrived):
              what Mosquitto itself delivers, and its publish-to-delivery lag
  controller  a real deploy.controller.Controller (parse, store in batches, publish receipts);
              each publisher subscribes to its stations' receipt topics and notes, for every
              message, when the first receipt covering its seq arrived

Target: the controller stores 2,000 msg/s sustained with p99 publish-to-receipt lag < 1 s.
Run: .venv/bin/python -m bench.controller_ingest [--stations 1000] [--duration-s 30]
The last line printed is JSON for machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import (
    MODELS,
    load_average,
    percentile,
    print_json_line,
    shipped_broker_settings,
    start_shipped_broker,
)
from deploy.config import ControllerConfig
from deploy.controller import Controller
from linesight import protocol as p
from linesight.mqtt import LinkConfig, parse_broker_url

TARGET_LAG_S = 1.0
_SEQ = re.compile(rb'"seq":(\d+)')
_ACTIVE = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)
_CANDIDATE = p.ModelRef(name="part-classifier", version="2.0.0", sha256="b" * 64)


@dataclass(frozen=True, slots=True)
class Load:
    url: str
    stations: int
    per_station_hz: float
    duration_s: float
    publishers: int

    @property
    def offered(self) -> float:
        return self.stations * self.per_station_hz


def station_name(index: int) -> str:
    return f"sim-{index:05d}"


def message(station: str, seq: int) -> bytes:
    """Even seqs are decisions, odd seqs the shadow result of the same part."""
    part = f"{station}-{seq // 2:08d}"
    if seq % 2 == 0:
        return p.Decision(
            station=station, seq=seq, part_id=part, decided_by=p.DecidedBy.ACTIVE, label="ok",
            confidence=0.97, action=p.Action.PASS, model=_ACTIVE, latency_ms=0.2,
            automation=p.AutomationLevel.PARTIAL, mode=p.DeploymentMode.SHADOW,
        ).to_json()
    return p.ShadowResult(
        station=station, seq=seq, part_id=part, mode=p.DeploymentMode.SHADOW,
        active=p.ModelOpinion(model=_ACTIVE, label="ok", confidence=0.97, latency_ms=0.2),
        candidate=p.ModelOpinion(model=_CANDIDATE, label="ok", confidence=0.95, latency_ms=0.5),
        agree=True,
    ).to_json()


def _client(url: str, name: str) -> paho.Client:
    address = parse_broker_url(url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(address.host, address.port, keepalive=60)
    return client


# --- publishers (one process each) -----------------------------------------------------------


def publish(load: Load, index: int, receipts: bool, control: Connection) -> None:
    """Publish this process's slice of the fleet; report publish times and receipt lags."""
    mine = [station_name(i) for i in range(index, load.stations, load.publishers)]
    per_round = 2  # a decision and its shadow result, back to back
    rate = len(mine) * load.per_station_hz
    rounds = int(load.duration_s * load.per_station_hz / per_round) + 1
    topics = p.Topics()
    schedule: list[tuple[int, int, str, bytes]] = []  # (station slot, seq, topic, payload)
    for round_ in range(rounds):
        for slot, station in enumerate(mine):
            for offset, channel in ((0, p.Channel.DECISION), (1, p.Channel.SHADOW)):
                seq = round_ * per_round + offset
                topic = topics.station(station, channel)
                schedule.append((slot, seq, topic, message(station, seq)))
    schedule = schedule[: int(rate * load.duration_s)]
    published: list[list[float]] = [[] for _ in mine]
    receipted: list[int] = [-1] * len(mine)
    lags: list[tuple[float, float]] = []  # (published at, lag)
    slot_of = {station: slot for slot, station in enumerate(mine)}
    lock = threading.Lock()

    def on_receipt(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        document = json.loads(msg.payload)
        slot = slot_of.get(document["station"])
        if slot is None:
            return
        with lock:
            sent = published[slot]
            upto = min(int(document["upto_seq"]), len(sent) - 1)
            for seq in range(receipted[slot] + 1, upto + 1):
                lags.append((sent[seq], now - sent[seq]))
            receipted[slot] = max(receipted[slot], upto)

    client = _client(load.url, f"bench-publisher-{index}")
    client.on_message = on_receipt
    client.loop_start()
    if receipts:
        client.subscribe([(topics.station(s, p.Channel.RECEIPT), 1) for s in mine])
    control.send("ready")
    start = float(control.recv())  # a shared monotonic start time
    time.sleep(max(0.0, start - time.monotonic()))
    sent_count = 0
    while sent_count < len(schedule):
        due = min(len(schedule), int((time.monotonic() - start) * rate) + 1)
        while sent_count < due:
            slot, seq, topic, payload = schedule[sent_count]
            with lock:
                published[slot].append(time.monotonic())
            client.publish(topic, payload, qos=1)
            sent_count += 1
        time.sleep(0.002)
    control.recv()  # the parent says when the drain is over
    with lock:
        report = {
            "published": sent_count,
            "lags": list(lags),
            "times": {mine[slot]: times for slot, times in enumerate(published)},
        }
    client.disconnect()
    client.loop_stop()
    control.send(report)


# --- the plain subscriber ----------------------------------------------------------------------


def count(url: str, control: Connection) -> None:
    """Subscribe like the controller does (QoS 1) and only count, noting each arrival."""
    arrivals: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        found = _SEQ.search(msg.payload)
        station = msg.topic.split("/")[-2]
        with lock:
            arrivals.append((station, int(found.group(1)) if found else -1, now))

    client = _client(url, "bench-counter")
    client.on_message = on_message
    client.subscribe([("linesight/v1/stations/+/decision", 1),
                      ("linesight/v1/stations/+/shadow", 1)])
    client.loop_start()
    control.send("ready")
    control.recv()
    client.disconnect()
    client.loop_stop()
    with lock:
        control.send(list(arrivals))


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunResult:
    published: int
    measured_rate: float  # stored (controller) or delivered (raw) per second, after warm-up
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float
    missing: int  # never stored / receipted (controller) or never delivered (raw)
    extra: dict[str, Any]


def _start(context: Any, target: Any, *args: Any) -> tuple[Any, Connection]:
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    if not parent.poll(120) or parent.recv() != "ready":
        process.kill()
        raise RuntimeError(f"{target.__name__} process did not start")
    return process, parent


def run(load: Load, *, controller: bool, warmup_s: float, drain_s: float) -> RunResult:
    context = multiprocessing.get_context("spawn")
    counter: tuple[Any, Connection] | None = None
    ingest: Controller | None = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-controller-")
    try:
        if controller:
            ingest = Controller(ControllerConfig(
                broker=LinkConfig(url=load.url, client_id="linesight-fleet-controller"),
                data_dir=Path(tmp.name), bundles=MODELS,
            ))
            ingest.start()
            if not ingest.link.wait_connected(10):
                raise RuntimeError("the controller could not connect")
            time.sleep(0.5)  # its SUBSCRIBEs are answered
        else:
            counter = _start(context, count, load.url)
        publishers = [
            _start(context, publish, load, i, controller) for i in range(load.publishers)
        ]
        start = time.monotonic() + 0.5
        for _, pipe in publishers:
            pipe.send(start)
        time.sleep(max(0.0, start + warmup_s - time.monotonic()))
        stored0 = ingest.counters.stored if ingest else 0
        measure_from = time.monotonic()
        time.sleep(max(0.0, start + load.duration_s - time.monotonic()))
        measured_s = time.monotonic() - measure_from
        stored = (ingest.counters.stored - stored0) if ingest else 0
        extra: dict[str, Any] = {}
        if ingest:
            extra["backlog_at_end"] = ingest._inbox.qsize()  # noqa: SLF001 - diagnostics
        # Drain: wait until nothing moves any more (or drain_s).
        deadline = time.monotonic() + drain_s
        last = -1
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = ingest.counters.stored if ingest else 0
            if ingest and now == last and ingest._inbox.qsize() == 0:  # noqa: SLF001
                break
            last = now
        if not ingest:
            time.sleep(2.0)
        for _, pipe in publishers:
            pipe.send("done")
        reports = [pipe.recv() for _, pipe in publishers]
        published = sum(r["published"] for r in reports)
        if ingest:
            assert counter is None
            counters = ingest.counters
            lags = [lag for r in reports for at, lag in r["lags"] if at >= measure_from]
            receipted = sum(len(r["lags"]) for r in reports)
            extra.update(received=counters.received, stored=counters.stored,
                         batches=counters.batches, receipts=counters.receipts,
                         invalid=counters.invalid)
            rate = stored / measured_s
            missing = published - receipted
        else:
            assert counter is not None
            counter[1].send("done")
            arrivals: list[tuple[str, int, float]] = counter[1].recv()
            times: dict[str, list[float]] = {}
            for r in reports:
                times.update(r["times"])
            lags = []
            seen: set[tuple[str, int]] = set()
            delivered_in_window = 0
            for station, seq, arrived in arrivals:
                if (station, seq) in seen:
                    continue
                seen.add((station, seq))
                sent = times[station][seq]
                if sent >= measure_from:
                    lags.append(arrived - sent)
                if measure_from <= arrived <= measure_from + measured_s:
                    delivered_in_window += 1
            rate = delivered_in_window / measured_s
            missing = published - len(seen)
        for process, _ in publishers:
            process.join(timeout=10)
        return RunResult(
            published=published, measured_rate=rate, lag_p50_s=percentile(lags, 50),
            lag_p99_s=percentile(lags, 99), lag_max_s=max(lags, default=0.0),
            missing=missing, extra=extra,
        )
    finally:
        if ingest is not None:
            ingest.stop()
        if counter is not None:
            counter[0].join(timeout=10)
            if counter[0].is_alive():
                counter[0].kill()
        tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=1000)
    parser.add_argument("--per-station-hz", type=float, default=2.0,
                        help="messages per station per second (a decision and a shadow result)")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--drain-s", type=float, default=30.0)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    args = parser.parse_args(argv)
    if args.duration_s <= args.warmup_s:
        parser.error("--duration-s must be longer than --warmup-s")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as broker_dir:
        broker = start_shipped_broker(Path(broker_dir))
        try:
            load = Load(broker.url, args.stations, args.per_station_hz, args.duration_s,
                        args.publishers)
            print(f"controller ingest: {load.stations} stations x {load.per_station_hz:g} msg/s "
                  f"= {load.offered:.0f} msg/s offered for {load.duration_s:g} s "
                  f"({load.publishers} publisher processes, QoS 1); measured after "
                  f"{args.warmup_s:g} s; load average {load_before[0]:.2f}")
            print(f"broker: mosquitto with {', '.join(shipped_broker_settings())}")
            raw = run(load, controller=False, warmup_s=args.warmup_s, drain_s=args.drain_s)
            ctl = run(load, controller=True, warmup_s=args.warmup_s, drain_s=args.drain_s)
        finally:
            broker.stop()
    print()
    print(f"{'run':<36} {'published':>9} {'msgs/s':>8} {'lag p50':>9} {'lag p99':>9} "
          f"{'lag max':>9} {'missing':>8}")
    for name, result in (("raw (mosquitto -> counting subscriber)", raw),
                         ("controller (stored, receipted)", ctl)):
        print(f"{name:<36} {result.published:>9} {result.measured_rate:>8.0f} "
              f"{result.lag_p50_s:>8.3f}s {result.lag_p99_s:>8.3f}s {result.lag_max_s:>8.3f}s "
              f"{result.missing:>8}")
    extra = ctl.extra
    batches = max(int(extra.get("batches", 0)), 1)
    print(f"controller: {extra.get('stored')} stored in {batches} batches "
          f"({int(extra.get('stored', 0)) / batches:.1f} per batch), {extra.get('receipts')} "
          f"receipts ({int(extra.get('receipts', 0)) / batches:.1f} per batch), inbox backlog at "
          f"the end of publishing {extra.get('backlog_at_end')}")
    keeps_up = ctl.measured_rate >= 0.98 * load.offered and ctl.lag_p99_s < TARGET_LAG_S
    print(f"ingest / offered = {ctl.measured_rate / load.offered:.2f}, ingest / raw = "
          f"{ctl.measured_rate / max(raw.measured_rate, 1e-9):.2f}; receipt lag p99 "
          f"{ctl.lag_p99_s:.3f} s (target < {TARGET_LAG_S:g} s): "
          f"{'keeps up' if keeps_up else 'does NOT keep up'}; load average "
          f"{load_average()[0]:.2f}")
    print_json_line({
        "offered_msgs_per_s": round(load.offered, 1),
        "ingest_msgs_per_s": round(ctl.measured_rate, 1),
        "receipt_lag_p99_s": round(ctl.lag_p99_s, 3),
        "raw_delivery_msgs_per_s": round(raw.measured_rate, 1),
        "raw_lag_p99_s": round(raw.lag_p99_s, 4),
        "dropped": ctl.missing,
        "raw_dropped": raw.missing,
        "receipts_per_batch": round(int(extra.get("receipts", 0)) / batches, 1),
        "load_average": round(load_before[0], 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
