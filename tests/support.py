"""Helpers for integration tests: a message collector, a receipting stand-in for the controller's
ingest, and station configurations on the shipped bundles."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deploy.api import create_app
from deploy.client import ControllerClient
from deploy.config import ControllerConfig, load_controller_config
from deploy.controller import Controller
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, load_config
from linesight import protocol as p
from linesight.broker import free_port
from linesight.http_server import HttpServer
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage
from linesight.sim import SimulatedOperator

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
    the highest contiguous seq stored of the message's seq stream. (`stored` assumes one stream
    per station; the controller's own tests cover several.)"""

    def __init__(
        self, url: str, prefix: str = p.DEFAULT_PREFIX, ca_file: Path | None = None
    ) -> None:
        self.topics = p.Topics(prefix)
        self.stored: dict[str, dict[int, p.Envelope]] = {}
        self.deliveries: list[p.Envelope] = []  # every copy that arrived, duplicates included
        self._streams: dict[tuple[str, uuid.UUID | None], set[int]] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.link = MqttLink(LinkConfig(
            url=url, client_id=f"receipter-{uuid.uuid4().hex[:8]}", ca_file=ca_file
        ))
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
            self.stored.setdefault(parsed.station, {}).setdefault(parsed.seq, parsed)
            seqs = self._streams.setdefault((parsed.station, parsed.stream), set())
            seqs.add(parsed.seq)
            upto = -1
            while upto + 1 in seqs:
                upto += 1
            self._seq += 1
            receipt = p.Receipt(
                station=parsed.station, seq=self._seq, upto_seq=upto, upto_stream=parsed.stream
            )
        self.link.publish(
            self.topics.station(parsed.station, p.Channel.RECEIPT), receipt.to_json(), qos=1
        )

    def close(self) -> None:
        self.link.stop()


def leave_subscribed_session(config: LinkConfig, topic_filter: str) -> None:
    """Connect as `config.client_id`, subscribe to `topic_filter` and leave: the broker keeps
    that persistent session, subscription included."""
    link = MqttLink(config)
    link.subscribe(topic_filter, lambda message: None)
    subscribed = threading.Event()
    link.add_connect_listener(subscribed.set)  # runs once the SUBSCRIBE is on its way
    link.start()
    try:
        wait_for(subscribed.is_set, 10, f"{config.client_id} to subscribe")
    finally:
        link.stop()


def queued_for_session(config: LinkConfig, topic: str, publisher: MqttLink) -> list[bytes]:
    """Reconnect as `config.client_id`, subscribed to `topic`: what the broker had queued for
    that session, i.e. what arrives before a probe that `publisher` sends after the connect."""
    arrived: list[bytes] = []
    link = MqttLink(config)
    link.subscribe(topic, lambda message: arrived.append(message.payload))
    link.start()
    try:
        def probed() -> bool:
            if b"probe" not in arrived:
                publisher.publish(topic, b"probe").wait(1)
            return b"probe" in arrived

        wait_for(probed, 10, f"a probe on {config.client_id}'s connection")
    finally:
        link.stop()
    return arrived[: arrived.index(b"probe")]


@contextlib.contextmanager
def _serving(server: Any, name: str) -> Iterator[str]:
    """Run a socketserver-style `server` (serve_forever, shutdown, server_close, server_port)
    on a thread; yields its base URL, and stops it after."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def http_server(
    handler: Callable[..., BaseHTTPRequestHandler],
) -> contextlib.AbstractContextManager[str]:
    """A real HTTP server on a free 127.0.0.1 port, in a thread; yields its base URL."""
    return _serving(ThreadingHTTPServer(("127.0.0.1", 0), handler), "http-server")


@contextlib.contextmanager
def answering_server(answers: Iterable[bytes | None]) -> Iterator[str]:
    """A raw stand-in for an HTTP server on a free 127.0.0.1 port: each connection's request is
    read, then answered with the next of `answers` as it is, or closed without an answer for
    None (a controller killed or restarted while it handled the request). Yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        for answer in answers:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                if answer is not None:
                    connection.sendall(answer)

    threading.Thread(target=serve, name="answering-server", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


class QuietFiles(SimpleHTTPRequestHandler):
    """Serves a folder's files (bundles) without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def file_server(root: Path) -> contextlib.AbstractContextManager[str]:
    """`http_server` serving the files under `root`."""
    return http_server(functools.partial(QuietFiles, directory=str(root)))


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


@contextlib.contextmanager
def agent_running(config: AgentConfig) -> Iterator[Agent]:
    """The agent inspecting in a thread; stopped (and its stop waited for) at the end."""
    agent = Agent(config)
    finished = threading.Event()

    def run() -> None:
        agent.run()
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    try:
        yield agent
    finally:
        agent.stop()
        assert finished.wait(30), "the agent did not stop"


@contextlib.contextmanager
def unstarted_agent(data_dir: Path, station: str, **overrides: Any) -> Iterator[Agent]:
    """A station as it starts (slots restored), not running and without a broker: parts are
    judged by calling inspect(), commands go to handle_command."""
    agent = Agent(station_config(data_dir, "mqtt://127.0.0.1:1", station=station,
                                 outbox__relay="thread", **overrides))
    try:
        yield agent
    finally:
        agent.writer.close()
        agent.gate.close()
        agent.source.close()
        agent.store.close()


def command(station: str, body: Any, seq: int = 1) -> p.Command:
    return p.Command(station=station, seq=seq, cmd_id=uuid.uuid4(), body=body)


class MjpegCamera:
    """An IP camera's MJPEG endpoint (multipart/x-mixed-replace JPEG frames, 25 a second) on
    127.0.0.1. `frame(n)` gives the JPEG bytes of the n-th frame sent."""

    FRAME_PERIOD_S = 0.04

    def __init__(self, frame: Callable[[int], bytes], port: int = 0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.sent = 0
        self._stopping = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                while not camera._stopping.is_set():
                    body = frame(camera.sent)
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}"
                    try:
                        self.wfile.write(head.encode() + b"\r\n\r\n" + body + b"\r\n")
                        self.wfile.flush()
                    except OSError:
                        return  # the reader hung up
                    camera.sent += 1
                    camera._stopping.wait(MjpegCamera.FRAME_PERIOD_S)

        # HTTPServer sets allow_reuse_address: the camera can come back on the same port at once.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()  # every open stream is closed: the camera is gone
        self._thread.join(timeout=5)


# --- headless Chromium: Debian's package, else Playwright's own build (what scripts/setup
# --browser installs where apt has no chromium, as on Ubuntu) -------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def _playwright_chromium_installed() -> bool:
    browsers = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache"
                    / "ms-playwright")
    return any(browsers.glob("chromium*/chrome-linux*/chrome"))


HAVE_CHROMIUM = CHROMIUM.exists() or _playwright_chromium_installed()
NO_CHROMIUM = "needs a headless Chromium (scripts/setup --browser installs one)"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync",
]
# The browser tests take their screenshots in .cache/ (ignored by git), so a test run never
# changes the tree; LINESIGHT_SCREENSHOTS=docs/screenshots refreshes the documentation's.
SCREENSHOTS = Path(os.environ.get("LINESIGHT_SCREENSHOTS") or REPO / ".cache" / "screenshots")


def station_ui_server(store: Any, secret: bytes) -> contextlib.AbstractContextManager[str]:
    """The station UI over `store` on a free port of 127.0.0.1 (werkzeug, threaded); yields its
    base URL."""
    from werkzeug.serving import make_server

    from station_ui.app import create_app as create_ui_app
    from station_ui.config import UiConfig

    config = UiConfig(data_dir=store.data_dir, secret_key=secret, poll_interval_ms=500)
    server = make_server("127.0.0.1", 0, create_ui_app(config, store), threaded=True)
    return _serving(server, "station-ui")


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM) if CHROMIUM.exists() else None,
        args=CHROMIUM_ARGS, headless=True,
    )


def watched_page(browser: Any, problems: list[str], *, width: int = 1280, height: int = 800,
                 timeout_ms: int = 10_000) -> Any:
    """A page whose console errors and script errors (a CSP violation among them) are collected
    in `problems`, for the test to assert empty at the end."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(timeout_ms)
    return page


def sign_in(page: Any, base: str, badge: str, pin: str) -> None:
    """Sign in on the station screen at `base` with the on-screen keypad's form."""
    page.goto(f"{base}/")
    page.fill("#badge", badge)
    page.fill("#pin", pin)
    page.click(".keypad-go")


# --- a line of real agents in this process, and a controller serving its API -----------------


@dataclass
class AgentLine:
    """Stations on the synthetic source, each an Agent on a thread of this process, with
    simulated operators answering the review queues of `operated` stations."""

    broker_url: str
    root: Path
    stations: Sequence[str]
    rate: float = 25.0
    seed: int = 20
    operated: Sequence[str] | None = None  # None: every station
    command_key: Path | None = None  # the public key of signed commands, when they are
    agents: dict[str, Agent] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    operators: list[SimulatedOperator] = field(default_factory=list)

    def start(self) -> None:
        for index, station in enumerate(self.stations):
            data = self.root / station
            agent = Agent(station_config(
                data, self.broker_url, station=station, automation="partial",
                source=f"synthetic:seed={self.seed + index},rate={self.rate:g}",
                state_interval_s=1.0, command_key=self.command_key,
            ))
            self.agents[station] = agent
            thread = threading.Thread(target=agent.run, name=f"agent-{station}", daemon=True)
            thread.start()
            self.threads.append(thread)
            if self.operated is None or station in self.operated:
                self.operators.append(SimulatedOperator(data, badge=f"op-{station}").start())

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for thread in self.threads:
            thread.join(30)
        for operator in self.operators:
            operator.stop()


def unstarted_controller(tmp_path: Path, *, signed: bool = True, **settings: Any) -> Controller:
    """A controller over a copy of the shipped 2.0.0 bundle (checked with the demo key when
    signed), built but never started: no broker, no threads. Close its store when done."""
    bundles = tmp_path / "bundles"
    shutil.copytree(V2, bundles / "part-classifier" / "2.0.0")
    return Controller(ControllerConfig(
        broker=LinkConfig(url="mqtt://127.0.0.1:1", client_id="unit-controller"),
        data_dir=tmp_path / "fleet", bundles=bundles, key=DEMO_PUB if signed else None,
        **settings,
    ))


@contextlib.contextmanager
def served_controller(
    root: Path, broker_url: str, **settings: Any
) -> Iterator[tuple[Controller, ControllerClient]]:
    """A fleet controller over the shipped bundles, its API served on a free port."""
    port = free_port()
    controller = Controller(load_controller_config(None, {
        "broker.url": broker_url, "data_dir": root / "fleet", "bundles": MODELS,
        "key": DEMO_PUB, "http_port": port, "tick_s": 0.5, **settings,
    }))
    server = HttpServer(create_app(controller), "127.0.0.1", port)
    controller.start()
    server.start()
    try:
        yield controller, ControllerClient(server.url)
    finally:
        server.stop()
        controller.stop()


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def process_gone(pid: int) -> bool:
    """Whether `pid` has exited (gone, or a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def kill_agent(process: subprocess.Popen[bytes]) -> None:
    """kill -9 an agent process, then wait for its outbox relay (a child process) to follow."""
    relays = children_of(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    for relay in relays:
        wait_for(functools.partial(process_gone, relay), 30, "the relay to exit with its agent")
