"""Input drift (PSI against the promotion-time reference) and the reject gate outputs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edge_agent.actuator import (
    BackgroundGate,
    InlineGate,
    LoggingGate,
    PartSignal,
    WebhookGate,
    build_gate,
    start_gate,
)
from edge_agent.config import LogRejectOutput, WebhookRejectOutput
from edge_agent.drift import DriftMonitor, Reference, bin_edges, image_stats, proportions, psi
from linesight import protocol as p


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(100, 10, 2000).tolist()
    edges = bin_edges(reference)
    same = proportions(rng.normal(100, 10, 2000).tolist(), edges)
    shifted = proportions(rng.normal(120, 10, 2000).tolist(), edges)
    base = proportions(reference, edges)
    assert psi(base, same) < 0.05
    assert psi(base, shifted) > 0.25
    with pytest.raises(ValueError, match="same bins"):
        psi([0.5, 0.5], [1.0])


def test_the_first_window_is_the_reference_and_a_darker_line_drifts() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(window=200)
    for _ in range(200):
        monitor.add((float(rng.normal(120, 5)), 40.0 + float(rng.normal()), 300.0),
                    float(rng.uniform(0.8, 1.0)))
    assert monitor.reference is not None and monitor.last is None
    for _ in range(200):
        monitor.add((float(rng.normal(120, 5)), 40.0 + float(rng.normal()), 300.0),
                    float(rng.uniform(0.8, 1.0)))
    assert monitor.last is not None and not monitor.last.drifting
    for _ in range(200):  # the lamp dims
        monitor.add((float(rng.normal(80, 5)), 40.0 + float(rng.normal()), 300.0),
                    float(rng.uniform(0.8, 1.0)))
    assert monitor.last.drifting and monitor.last.psi_brightness > 0.25
    restored = Reference.from_dict(json.loads(json.dumps(monitor.reference.to_dict())))
    assert restored.edges == monitor.reference.edges
    monitor.reset()
    assert monitor.reference is None and monitor.last is None


def test_image_stats_see_brightness_and_blur() -> None:
    rng = np.random.default_rng(3)
    sharp = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 200, dtype=np.uint8)
    bright_sharp, _, sharpness_sharp = image_stats(sharp)
    bright_flat, contrast_flat, sharpness_flat = image_stats(flat)
    assert bright_flat > bright_sharp and contrast_flat == 0
    assert sharpness_sharp > sharpness_flat == 0


def decision(action: str = "reject") -> PartSignal:
    return PartSignal.of(p.Decision(
        station="s1", seq=7, part_id="part-9", decided_by=p.DecidedBy.ACTIVE, label="defect",
        confidence=0.9, action=p.Action(action),
        model=p.ModelRef(name="m", version="1.0.0", sha256="a" * 64), latency_ms=2.0,
        automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.NONE,
    ))


class Recorder(BaseHTTPRequestHandler):
    bodies: list[dict[str, object]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        length = int(self.headers["Content-Length"])
        Recorder.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(Recorder.status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def plc() -> Iterator[str]:
    Recorder.bodies, Recorder.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/reject"
    server.shutdown()
    server.server_close()


def test_the_webhook_posts_each_decision(plc: str) -> None:
    gate = build_gate(WebhookRejectOutput(type="webhook", url=plc, timeout_s=2))
    assert isinstance(gate, WebhookGate)
    gate.act(decision())
    assert Recorder.bodies == [{
        "station": "s1", "part_id": "part-9", "action": "reject", "decided_by": "active",
        "label": "defect", "confidence": 0.9, "seq": 7,
    }]


def test_a_failing_webhook_raises_oserror(plc: str) -> None:
    Recorder.status = 500
    gate = WebhookGate(plc, 2)
    with pytest.raises(OSError, match="500"):
        gate.act(decision())
    nowhere = WebhookGate("http://127.0.0.1:9/none", 0.5)
    with pytest.raises(OSError, match="failed"):
        nowhere.act(decision())


def test_the_default_gate_only_logs() -> None:
    gate = build_gate(LogRejectOutput())
    assert isinstance(gate, LoggingGate)
    gate.act(decision("pass"))


def test_only_a_gate_that_can_block_gets_a_thread() -> None:
    errors: list[str] = []
    inline = start_gate(build_gate(LogRejectOutput()), errors.append)
    assert isinstance(inline, InlineGate)
    inline.act(decision("reject"))
    webhook = build_gate(
        WebhookRejectOutput(type="webhook", url="http://127.0.0.1:9/none", timeout_s=0.5)
    )
    background = start_gate(webhook, errors.append)
    try:
        assert isinstance(background, BackgroundGate)
    finally:
        background.close()
    assert errors == []


def test_an_inline_gate_reports_a_failure_and_keeps_going() -> None:
    errors: list[str] = []
    oks: list[bool] = []
    failing = WebhookGate("http://127.0.0.1:9/none", 0.5)
    inline = InlineGate(failing, errors.append, lambda: oks.append(True))
    inline.act(decision("reject"))
    assert len(errors) == 1
    assert "failed" in errors[0]
    inline.gate = build_gate(LogRejectOutput())
    inline.act(decision("pass"))
    assert oks == [True]


def test_the_background_gate_posts_on_its_thread_and_reports_failures(plc: str) -> None:
    errors: list[str] = []
    oks: list[bool] = []
    gate = start_gate(WebhookGate(plc, 2), errors.append, lambda: oks.append(True))
    assert isinstance(gate, BackgroundGate)
    gate.act(decision("reject"))
    gate.close()  # drains what was queued
    assert [body["action"] for body in Recorder.bodies] == ["reject"]
    assert oks == [True] and errors == []

    Recorder.status = 500
    failing = start_gate(WebhookGate(plc, 2), errors.append)
    failing.act(decision("pass"))
    failing.close()
    assert len(errors) == 1 and "HTTP 500" in errors[0]
