"""Helpers for integration tests: a message collector, a receipting stand-in for the controller's
ingest, and station configurations on the shipped bundles."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, load_config
from linesight import protocol as p
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
DEMO_PUB = MODELS / "keys" / "demo.pub"
DEMO_KEY = MODELS / "keys" / "demo.key"
V1 = MODELS / "part-classifier" / "1.0.0"
V2 = MODELS / "part-classifier" / "2.0.0"
V21 = MODELS / "part-classifier" / "2.1.0"
GRAY = MODELS / "part-classifier-gray" / "1.0.0"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Collector:
    """Subscribes to every station channel and keeps what arrives, parsed."""

    def __init__(self, url: str, prefix: str = p.DEFAULT_PREFIX) -> None:
        self.topics = p.Topics(prefix)
        self.messages: list[p.Envelope] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.link = MqttLink(LinkConfig(url=url, client_id=f"collector-{uuid.uuid4().hex[:8]}"))
        self.link.subscribe(f"{prefix}/stations/+/+", self._on_message)
        self.link.start()
        assert self.link.wait_connected(10), "collector could not connect"

    def _on_message(self, message: ReceivedMessage) -> None:
        try:
            where = self.topics.parse_station_topic(message.topic)
            parsed = p.parse_station_message(where.channel, message.payload)
        except (ValueError, p.ProtocolError) as exc:
            with self._lock:
                self.errors.append(f"{message.topic}: {exc}")
            return
        with self._lock:
            self.messages.append(parsed)

    def of(self, kind: type[p.M], station: str | None = None) -> list[p.M]:
        with self._lock:
            return [
                m for m in self.messages
                if isinstance(m, kind) and (station is None or m.station == station)
            ]

    def unique(self, kind: type[p.M], station: str | None = None) -> list[p.M]:
        """One per msg_id, in seq order (at-least-once delivery may repeat a message)."""
        seen: dict[uuid.UUID, p.M] = {}
        for message in self.of(kind, station):
            seen.setdefault(message.msg_id, message)
        return sorted(seen.values(), key=lambda m: m.seq)

    def acks(self, cmd_id: uuid.UUID) -> list[p.CommandAck]:
        return [a for a in self.of(p.CommandAck) if a.cmd_id == cmd_id]

    def close(self) -> None:
        self.link.stop()


class Receipter:
    """What the controller's ingest does for the outbox: store by (station, seq), answer with
    the highest contiguous seq stored."""

    def __init__(self, url: str, prefix: str = p.DEFAULT_PREFIX) -> None:
        self.topics = p.Topics(prefix)
        self.stored: dict[str, dict[int, p.Envelope]] = {}
        self.deliveries: list[p.Envelope] = []  # every copy that arrived, duplicates included
        self._lock = threading.Lock()
        self._seq = 0
        self.link = MqttLink(LinkConfig(url=url, client_id=f"receipter-{uuid.uuid4().hex[:8]}"))
        for channel in p.Channel:
            if p.DELIVERY[channel].durable:
                self.link.subscribe(self.topics.every_station(channel), self._on_message)
        self.link.start()
        assert self.link.wait_connected(10), "receipter could not connect"

    def _on_message(self, message: ReceivedMessage) -> None:
        where = self.topics.parse_station_topic(message.topic)
        parsed = p.parse_station_message(where.channel, message.payload)
        with self._lock:
            self.deliveries.append(parsed)
            stored = self.stored.setdefault(parsed.station, {})
            stored.setdefault(parsed.seq, parsed)
            upto = -1
            while upto + 1 in stored:
                upto += 1
            self._seq += 1
            receipt = p.Receipt(station=parsed.station, seq=self._seq, upto_seq=upto)
        self.link.publish(
            self.topics.station(parsed.station, p.Channel.RECEIPT), receipt.to_json(), qos=1
        )

    def close(self) -> None:
        self.link.stop()


def station_config(
    data_dir: Path, broker_url: str, station: str = "press-01", **overrides: Any
) -> AgentConfig:
    """A station on the synthetic source with the shipped 1.0.0 as its active model."""
    values: dict[str, Any] = {
        "station": station,
        "broker.url": broker_url,
        "source": "synthetic:seed=11",
        "active": V1,
        "data_dir": data_dir,
        "key": DEMO_PUB,
        "outbox.receipt_wait_s": 10.0,
        "outbox.resend_after_s": 2.0,
        "metrics_interval_s": 1.0,
        "state_interval_s": 2.0,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(None, values)


def command(station: str, body: Any, seq: int = 1) -> p.Command:
    return p.Command(station=station, seq=seq, cmd_id=uuid.uuid4(), body=body)
