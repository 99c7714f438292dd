"""The station agent end to end: real mosquitto, real onnxruntime on the shipped bundles."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from edge_agent.agent import Agent
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.artifacts import (
    MODEL_FILE,
    InputSpec,
    OutputSpec,
    build_bundle,
)
from linesight.broker import Broker
from tests.support import V2, Collector, Receipter, station_config, wait_for


@pytest.fixture
def collector(broker: Broker) -> object:
    c = Collector(broker.url)
    yield c
    c.close()


@pytest.fixture
def receipter(broker: Broker) -> object:
    r = Receipter(broker.url)
    yield r
    r.close()


def run_agent(agent: Agent) -> int:
    return agent.run()


@pytest.mark.parametrize("relay", ["process", "thread"])
def test_shadow_run_publishes_a_decision_and_a_shadow_result_per_part(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter, relay: str
) -> None:
    config = station_config(
        tmp_path, broker.url, candidate=V2, mode="shadow", automation="partial", max_parts=30,
        inference__candidate_queue=64, outbox__relay=relay,
    )
    assert Agent(config).run() == 0
    wait_for(lambda: len(collector.unique(p.ShadowResult)) >= 30, 10, "30 shadow results")
    decisions = collector.unique(p.Decision)
    shadows = collector.unique(p.ShadowResult)
    assert len(decisions) == 30 and len(shadows) == 30
    assert {d.part_id for d in decisions} == {s.part_id for s in shadows}
    seqs = sorted(m.seq for m in (*decisions, *shadows))
    assert seqs == list(range(60)), "decisions and shadow results share one contiguous seq"
    for shadow in shadows:
        assert shadow.active.model.version == "1.0.0"
        assert shadow.candidate.model.version == "2.0.0"
        assert shadow.agree == (shadow.active.label == shadow.candidate.label)
    assert all(d.model is None or d.model.version == "1.0.0" for d in decisions)
    states = collector.of(p.StationState)
    online = [s for s in states if s.online]
    assert online and online[-1].active and online[-1].candidate
    assert online[-1].candidate.version == "2.0.0" and online[-1].mode == p.DeploymentMode.SHADOW
    assert states[-1].online is False, "a clean stop publishes offline state"
    assert not collector.errors


def test_the_candidate_worker_yields_the_cpu_to_the_active_model(
    tmp_path: Path, broker: Broker, receipter: Receipter
) -> None:
    config = station_config(
        tmp_path, broker.url, candidate=V2, mode="shadow", source="synthetic:seed=3,rate=40",
        max_parts=400, inference__candidate_nice=7,
    )
    agent = Agent(config)
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    try:
        registry = agent.metrics.registry
        wait_for(lambda: (registry.get_sample_value(
            "linesight_shadow_pairs_total", {"station": "press-01"}) or 0) >= 3, 20, "3 pairs")
        worker = next(t for t in threading.enumerate() if t.name == "candidate-press-01")
        base = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's nice value: the process's
        assert worker.native_id is not None and loop.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(base + 7, 19)
        assert os.getpriority(os.PRIO_PROCESS, loop.native_id) == base, "the loop keeps its own"
    finally:
        agent.stop()
        loop.join(30)


@pytest.mark.parametrize(
    ("automation", "expect"),
    [
        ("human_only", lambda d: d.action == "review" and d.decided_by == "operator"
         and d.label is None),
        ("full", lambda d: d.action in ("pass", "reject") and d.decided_by == "active"),
    ],
)
def test_degrees_of_automation(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter,
    automation: str, expect: object,
) -> None:
    config = station_config(tmp_path, broker.url, automation=automation, max_parts=25,
                            audit_fraction=0.0)
    assert Agent(config).run() == 0
    wait_for(lambda: len(collector.unique(p.Decision)) >= 25, 10, "25 decisions")
    decisions = collector.unique(p.Decision)
    assert len(decisions) == 25
    assert all(expect(d) for d in decisions)  # type: ignore[operator]


def test_partial_sends_low_confidence_parts_to_review(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter
) -> None:
    # A threshold of 0.99 on both labels: many parts fall below it.
    config = station_config(
        tmp_path, broker.url, automation="partial", max_parts=60, audit_fraction=0.0,
        thresholds={"ok": 0.99, "defect": 0.99},
    )
    agent = Agent(config)
    assert agent.run() == 0
    wait_for(lambda: len(collector.unique(p.Decision)) >= 60, 10, "60 decisions")
    decisions = collector.unique(p.Decision)
    reviewed = [d for d in decisions if d.action == "review"]
    decided = [d for d in decisions if d.action != "review"]
    assert reviewed and decided
    assert all(d.confidence is not None and d.confidence < 0.99 for d in reviewed)
    assert all(d.review_reason == "low_confidence" for d in reviewed)
    assert all(d.confidence is not None and d.confidence >= 0.99 for d in decided)
    assert all(d.suggestion in ("ok", "defect") for d in reviewed)


def nan_bundle(folder: Path) -> tuple[Path, Path]:
    """A signed bundle whose model answers NaN for every image (0/0), and its public key."""
    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
            helper.make_node("Sub", ["mean", "mean"], ["zero"]),
            helper.make_node("Div", ["zero", "zero"], ["nan"]),
            helper.make_node("MatMul", ["nan", "W"], ["probabilities"]),
        ],
        "nan",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("W", TensorProto.FLOAT, [3, 2], np.ones(6).tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    (folder / MODEL_FILE).write_bytes(model.SerializeToString())
    key = Ed25519PrivateKey.generate()
    build_bundle(
        folder, name="part-classifier", version="9.0.0", description="answers NaN",
        input=InputSpec(name="image", layout="NCHW", height=32, width=32, colour="rgb",
                        dtype="float32"),
        output=OutputSpec(name="probabilities"), labels=("ok", "defect"), defect_label="defect",
        thresholds={"ok": 0.5, "defect": 0.5}, metrics=None, private_key=key,
    )
    public = folder.parent / "nan.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return folder, public


@pytest.mark.parametrize("automation", ["full", "partial", "assist"])
def test_a_model_answering_nan_never_passes_a_part(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter, automation: str
) -> None:
    bundle, public = nan_bundle(tmp_path / "nan" / "9.0.0")
    config = station_config(tmp_path / "station", broker.url, active=bundle, key=public,
                            automation=automation, max_parts=15)
    assert Agent(config).run() == 0
    wait_for(lambda: len(collector.unique(p.Decision)) >= 15, 10, "15 decisions")
    decisions = collector.unique(p.Decision)
    assert all(d.action == "review" and d.decided_by == "failsafe" for d in decisions)
    faults = [f for s in collector.of(p.StationState) for f in s.faults]
    assert any(f.code == "active_inference" and "NaN" in f.message.replace("nan", "NaN")
               for f in faults)


def test_a_model_that_cannot_load_holds_every_part(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    config = station_config(tmp_path / "station", broker.url, active=broken, max_parts=5,
                            automation="full")
    assert Agent(config).run() == 0
    wait_for(lambda: len(collector.unique(p.Decision)) >= 5, 10, "5 decisions")
    assert all(d.decided_by == "failsafe" for d in collector.unique(p.Decision))
    faults = [f.code for s in collector.of(p.StationState) for f in s.faults]
    assert "active_load" in faults


def test_without_a_controller_a_bounded_run_still_ends(tmp_path: Path, broker: Broker) -> None:
    config = station_config(tmp_path, broker.url, max_parts=5, outbox__receipt_wait_s=0.5)
    agent = Agent(config)
    done = threading.Event()
    result: list[int] = []

    def go() -> None:
        result.append(agent.run())
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(30), "the agent did not exit without receipts"
    assert result == [0]
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 5, "unreceipted decisions stay owed for the next start"


def test_prometheus_metrics_and_station_metrics_are_published(
    tmp_path: Path, broker: Broker, collector: Collector, receipter: Receipter
) -> None:
    import urllib.request

    from linesight.broker import free_port

    port = free_port()
    config = station_config(tmp_path, broker.url, candidate=V2, mode="shadow", max_parts=40,
                            metrics_port=port, source="synthetic:seed=2,rate=20",
                            metrics_interval_s=0.5)
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    wait_for(lambda: agent.parts_inspected >= 10, 30, "parts")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    thread.join(60)
    for name in ("linesight_parts_total", "linesight_decisions_total",
                 "linesight_inference_latency_ms_bucket", "linesight_confidence_bucket",
                 "linesight_outbox_depth", "linesight_frame_age_seconds"):
        assert name in text, name
    wait_for(lambda: bool(collector.of(p.StationMetrics)), 10, "a StationMetrics message")
    metrics = collector.of(p.StationMetrics)
    assert sum(m.parts for m in metrics) > 0
    assert any(m.shadow_pairs > 0 and m.agreement_rate is not None for m in metrics)
    assert any("active" in m.latency and "candidate" in m.latency for m in metrics)


def test_sigterm_stops_the_agent_cleanly(tmp_path: Path, broker: Broker,
                                         collector: Collector) -> None:
    import signal
    import subprocess
    import sys

    from tests.support import DEMO_PUB, V1

    with (tmp_path / "agent.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "agent", "--station", "press-05",
             "--broker", broker.url, "--source", "synthetic:seed=1,rate=20", "--active",
             str(V1), "--data-dir", str(tmp_path / "data"), "--key", str(DEMO_PUB)],
            stdout=log, stderr=log,
        )
    try:
        wait_for(lambda: len(collector.of(p.Decision, "press-05")) >= 5, 60, "decisions")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wait_for(lambda: any(not s.online for s in collector.of(p.StationState, "press-05")), 10,
             "the offline state")
    with StationStore(tmp_path / "data") as store:
        assert store.last_seq() >= 4
