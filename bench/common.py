"""What the benchmarks share: the machine description, percentiles, a frame replay source, a
light receipting stand-in for the controller and the shipped broker settings.

Nothing here imports tests/: a benchmark is a program a user can run on a line server.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.sources import EndOfSource, Frame
from linesight import protocol as p
from linesight.broker import Broker, find_mosquitto
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
ACTIVE_BUNDLE = MODELS / "part-classifier" / "1.0.0"
CANDIDATE_BUNDLE = MODELS / "part-classifier" / "2.0.0"
DEMO_PUB = MODELS / "keys" / "demo.pub"
SHIPPED_MOSQUITTO_CONF = REPO / "deploy" / "mosquitto.conf"

U8 = npt.NDArray[np.uint8]

# Settings of deploy/mosquitto.conf that shape throughput and loss; the benchmarks' broker uses
# them so it measures the broker a line server ships with.
_BROKER_TUNING_KEYS = (
    "max_queued_messages",
    "max_queued_bytes",
    "max_inflight_messages",
    "persistent_client_expiration",
    "autosave_interval",
    "autosave_on_changes",
    "set_tcp_nodelay",
    "max_keepalive",
    "max_packet_size",
)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


# --- the machine -----------------------------------------------------------------------------


def _first_match(path: str, pattern: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else None


def mosquitto_version() -> str:
    try:
        result = subprocess.run(  # noqa: S603 - fixed executable, no shell
            [str(find_mosquitto()), "-h"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired, RuntimeError):
        return "not found"
    match = re.search(r"mosquitto version (\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, OS and the versions that decide the figures."""
    import onnxruntime
    import paho.mqtt
    import pydantic

    memory_kb = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    cpu = _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor()
    os_name = _first_match("/etc/os-release", r'^PRETTY_NAME="?([^"\n]+)"?') or platform.system()
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count() or 0,
        "memory_gib": round(int(memory_kb) / 1024 / 1024, 1) if memory_kb else None,
        "os": f"{os_name} (kernel {platform.release()})",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "paho_mqtt": paho.mqtt.__version__,
        "pydantic": pydantic.VERSION,
        "mosquitto": mosquitto_version(),
    }


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


# --- the broker ------------------------------------------------------------------------------


def shipped_broker_settings(path: Path = SHIPPED_MOSQUITTO_CONF) -> list[str]:
    """The tuning lines of the shipped broker config (not its listeners, paths or logging)."""
    settings = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and line.split()[0] in _BROKER_TUNING_KEYS:
            settings.append(line)
    return settings


class ShippedBroker(Broker):
    """`linesight.broker.Broker` (own port, own data dir, stopped by pid) with the tuning of
    deploy/mosquitto.conf appended; a later line wins in mosquitto's config."""

    def _write_config(self) -> None:
        # Information-level logging stays: Broker.start() waits for mosquitto's "running" line,
        # which it logs there; connection messages (thousands in the ingest benchmark) go.
        super()._write_config()
        lines = [line for line in self.config_path.read_text().splitlines()
                 if not line.startswith("connection_messages")]
        lines += ["connection_messages false", *shipped_broker_settings()]
        self.config_path.write_text("\n".join(lines) + "\n")


def start_shipped_broker(data_dir: Path) -> Broker:
    return ShippedBroker(data_dir).start()


# --- a source that replays frames ------------------------------------------------------------


class ReplaySource:
    """Hands on pre-generated frames, cycling through them, each with a fresh part id, flat out
    or at `rate_hz` (a line's pace), until `finish()` is called; then `EndOfSource`, so the agent
    delivers what it owes."""

    reconnects = 0
    frame_age_s = 0.0

    def __init__(
        self, images: Sequence[U8], truths: Sequence[str | None], rate_hz: float | None = None
    ) -> None:
        self._interval = 1.0 / rate_hz if rate_hz else 0.0
        self._due = time.monotonic()
        self._images = list(images)
        self._truths = list(truths)
        self._index = 0
        self._finished = threading.Event()
        self.handed_on = 0

    def read(self, timeout: float) -> Frame | None:
        if self._finished.is_set():
            raise EndOfSource("replay finished")
        if self._interval:
            wait = self._due - time.monotonic()
            if wait > timeout:
                time.sleep(timeout)
                return None
            if wait > 0:
                time.sleep(wait)
            self._due = max(self._due + self._interval, time.monotonic() - self._interval)
        position = self._index % len(self._images)
        frame = Frame(
            part_id=f"replay-{self._index:08d}",
            image=self._images[position],
            captured_at=time.time(),
            truth=self._truths[position],
            seq=self._index,
        )
        self._index += 1
        self.handed_on = self._index
        return frame

    def finish(self) -> None:
        self._finished.set()

    def close(self) -> None:
        self._finished.set()


# --- a light receipter -----------------------------------------------------------------------


class LightReceipter:
    """The controller's part of delivery without its cost: reads station and seq with the json
    module, keeps the highest contiguous seq per station and answers with one Receipt per
    station every `interval_s` (the controller answers once per ingest batch, too).

    It also keeps each Decision's `latency_ms`, the deciding model's latency measured inside the
    agent.
    """

    def __init__(self, url: str, *, interval_s: float = 0.05) -> None:
        self.topics = p.Topics()
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str | None], set[int]] = {}
        self._upto: dict[tuple[str, str | None], int] = {}
        self._sent: dict[tuple[str, str | None], int] = {}
        self._seq = 0
        self.delivered = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self.link = MqttLink(
            LinkConfig(url=url, client_id=f"bench-receipter-{uuid.uuid4().hex[:8]}",
                       clean_start=True)
        )
        for channel in p.Channel:
            if p.DELIVERY[channel].durable:
                self.link.subscribe(self.topics.every_station(channel), self._on_message)
        self.link.start()
        if not self.link.wait_connected(10):
            raise RuntimeError("the receipter could not connect to the broker")
        self._thread = threading.Thread(target=self._answer, args=(interval_s,), daemon=True)
        self._thread.start()

    def _on_message(self, message: ReceivedMessage) -> None:
        document = json.loads(message.payload)
        station, seq = str(document["station"]), int(document["seq"])
        stream = document.get("stream")  # the station's seq stream; absent from simulators
        key = (station, None if stream is None else str(stream))
        with self._lock:
            self.delivered += 1
            if message.topic.endswith("/decision"):
                self.latencies.append(float(document["latency_ms"]))
            seen = self._seen.setdefault(key, set())
            seen.add(seq)
            upto = self._upto.get(key, -1)
            while upto + 1 in seen:
                upto += 1
                seen.discard(upto)
            self._upto[key] = upto

    def _answer(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                due = {s: u for s, u in self._upto.items() if u > self._sent.get(s, -1)}
                self._sent.update(due)
            for (station, stream), upto in due.items():
                self._seq += 1
                receipt = p.Receipt(
                    station=station, seq=self._seq, upto_seq=upto,
                    upto_stream=None if stream is None else uuid.UUID(stream),
                )  # fmt: skip
                self.link.publish(
                    self.topics.station(station, p.Channel.RECEIPT), receipt.to_json(), qos=1
                )

    def take_latencies(self) -> list[float]:
        with self._lock:
            taken, self.latencies = self.latencies, []
            return taken

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.link.stop()


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far, from /proc; 0 where unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_json_line(summary: dict[str, Any]) -> None:
    """The benchmark's last line: what bench/run_all.py collects."""
    print(json.dumps(summary), flush=True)


def serve_receipter(url: str, control: Connection) -> None:
    """Run a LightReceipter in its own process (the controller is never the agent's process):
    'take' answers with the decision latencies so far, 'stop' ends it."""
    receipter = LightReceipter(url)
    control.send("ready")
    try:
        while True:
            request = control.recv()
            if request == "take":
                control.send((receipter.delivered, receipter.take_latencies()))
            else:
                return
    finally:
        receipter.close()


class ReceipterProcess:
    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(target=serve_receipter, args=(url, child), daemon=True)
        self._process.start()
        if not self._control.poll(30) or self._control.recv() != "ready":
            self.close()
            raise RuntimeError("the receipter process did not start")

    def take(self) -> tuple[int, list[float]]:
        """(messages delivered so far, decision latencies since the last take)."""
        self._control.send("take")
        delivered, latencies = self._control.recv()
        return int(delivered), [float(v) for v in latencies]

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._control.send("stop")
            except OSError:
                pass
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
