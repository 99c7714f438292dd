"""A station whose clock is off: the controller works out how far from when its messages
arrive (a real mosquitto, a real controller), and says so in /api/stations and /metrics."""

from __future__ import annotations

import json
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from linesight import protocol as p
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import served_controller, wait_for

TOPICS = p.Topics()
REF = p.ModelRef(name="part-classifier", version="1.0.0", sha256="a" * 64)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own server
        text: str = response.read().decode()
        return text


def _decision(station: str, seq: int, ts: datetime) -> p.Decision:
    return p.Decision(
        station=station, seq=seq, stream=uuid.uuid4(), ts=ts, part_id=f"{station}-{seq}",
        decided_by=p.DecidedBy.ACTIVE, label="ok", confidence=0.9, action=p.Action.PASS,
        model=REF, latency_ms=1.0, automation=p.AutomationLevel.FULL,
        mode=p.DeploymentMode.NONE,
    )


def test_a_station_clock_hours_behind_or_minutes_ahead_is_measured(
    tmp_path: Path, broker: Broker
) -> None:
    with served_controller(tmp_path, broker.url) as (_, client):
        link = MqttLink(LinkConfig(url=broker.url, client_id="clock-test"))
        link.start()
        try:
            assert link.wait_connected(10)
            now = datetime.now(UTC)
            sent = {
                # A replayed backlog an hour old beside the fresh message: the fresh one counts.
                "press-behind": [now - timedelta(hours=4), now - timedelta(hours=3)],
                "press-ahead": [now + timedelta(minutes=7)],
                "press-right": [now],
            }
            for station, stamps in sent.items():
                for seq, ts in enumerate(stamps):
                    message = _decision(station, seq, ts)
                    topic = TOPICS.station(station, p.Channel.DECISION)
                    assert link.publish(topic, message.to_json(), qos=1).wait(10)

            def offsets() -> dict[str, float | None]:
                stations = json.loads(_get(client.url + "/api/stations"))["stations"]
                return {s["station"]: s["clock_behind_s"] for s in stations}

            wait_for(lambda: len(offsets()) == 3, 30, "the three stations")
        finally:
            link.stop()
        found = offsets()
        behind, ahead, right = (found[s] for s in ("press-behind", "press-ahead", "press-right"))
        assert behind is not None and 3 * 3600 <= behind < 3 * 3600 + 30, found
        assert ahead is not None and -7 * 60 <= ahead < -7 * 60 + 30, found
        assert right is not None and 0 <= right < 30, found
        gauges = {
            sample.labels["station"]: sample.value
            for family in text_string_to_metric_families(_get(client.url + "/metrics"))
            for sample in family.samples
            if sample.name == "linesight_fleet_station_clock_behind_seconds"
        }
        assert gauges.keys() == found.keys()
        assert abs(gauges["press-behind"] - behind) < 30
