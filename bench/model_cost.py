"""Where does the agent's own cost stop mattering? The agent benchmark's ratio on heavier models.

The shipped models are tiny (0.06 and 0.3 ms an inference here), so the agent's per-part Python
weighs as much as the models themselves. A line's inspection model costs more. For each level,
both shipped models get N extra 3x3 convolutions (32 channels, at their input size) in a side
branch whose result is multiplied by zero: their answers are unchanged (checked on every level),
only their cost grows. The bundles are signed with a key made for the run. On the same
pre-generated parts, each level measures:

  raw       both models in a minimal loop, the best of four onnxruntime settings
            (1 thread each, spinning or not, one after the other or on two Python threads)
  sustained the highest line rate a real agent holds with the candidate in shadow on every
            part (a bisection of paced runs, as in bench/agent_throughput.py: flat out, the
            candidate yields to the active model by design and skips parts), and at that rate
            the active model's p99 with the candidate in shadow against without a candidate

and prints sustained pairs / raw and the p99 factor against the model cost of a pair. This does not
replace the agent benchmark's targets, which stay measured on the shipped models; it says from
which model cost the agent's own cost stops mattering.
Run: .venv/bin/python -m bench.model_cost [--layers 0 1 2 4 8] [--rounds 2] [--measure-s 6]
The last line printed is JSON for machines.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bench.agent_throughput import (
    SEARCH,
    TARGET_LATENCY_FACTOR,
    TARGET_RATIO,
    Model,
    PipelineRun,
    _median_run,
    _session,
    model_latency_ms,
    raw_rate,
    run_pipeline,
    sustained_rate,
)
from bench.common import (
    ACTIVE_BUNDLE,
    CANDIDATE_BUNDLE,
    U8,
    load_average,
    print_json_line,
    start_shipped_broker,
)
from edge_agent.preprocess import preprocess
from edge_agent.synthetic import PartGenerator
from linesight.artifacts import (
    MODEL_FILE,
    generate_keypair,
    load_private_key,
    resign_bundle,
    verify_bundle,
)

# The settings the agent benchmark's search has found best on every machine so far.
RAW_SETTINGS = (SEARCH[0], SEARCH[1], SEARCH[5], SEARCH[6])


def heavier_model(source: Path, target: Path, layers: int, channels: int = 32) -> None:
    """The model at `source` with `layers` extra convolutions whose result is multiplied by zero
    and added to its logits: the same answers for more work. 0 layers: a plain copy."""
    model = onnx.load(str(source))
    graph = model.graph
    nodes = list(graph.node)
    at = next(i for i, node in enumerate(nodes) if node.op_type == "Softmax")
    softmax = nodes[at]
    rng = np.random.default_rng(layers)
    extra: list[onnx.NodeProto] = []
    x, c_in = graph.input[0].name, 3
    for i in range(layers):
        weights = (rng.standard_normal((channels, c_in, 3, 3)) * 0.1).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(weights, f"extra_w{i}"))
        extra.append(helper.make_node("Conv", [x, f"extra_w{i}"], [f"extra_c{i}"],
                                      pads=[1, 1, 1, 1]))
        extra.append(helper.make_node("Relu", [f"extra_c{i}"], [f"extra_r{i}"]))
        x, c_in = f"extra_r{i}", channels
    if layers:
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "extra_zero"))
        extra += [
            helper.make_node("ReduceMean", [x], ["extra_mean"], keepdims=0),
            helper.make_node("Mul", ["extra_mean", "extra_zero"], ["extra_nothing"]),
            helper.make_node("Add", [softmax.input[0], "extra_nothing"], ["extra_logits"]),
        ]
        softmax.input[0] = "extra_logits"
    del graph.node[:]
    graph.node.extend([*nodes[:at], *extra, *nodes[at:]])  # still in topological order
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def heavier_bundle(source: Path, target: Path, layers: int, private_key: Path) -> Model:
    """A copy of the bundle at `source` with the heavier model, signed again; its answers are
    checked against the original's."""
    shutil.copytree(source, target)
    heavier_model(source / MODEL_FILE, target / MODEL_FILE, layers)
    manifest = resign_bundle(target, load_private_key(private_key))
    original, heavy = Model(manifest, source / MODEL_FILE), Model(manifest, target / MODEL_FILE)
    image = PartGenerator(3).part(0).image
    tensor = {manifest.input.name: preprocess(image, manifest.input)}
    want = _session(original, SEARCH[0]).run(None, tensor)[0]
    got = _session(heavy, SEARCH[0]).run(None, tensor)[0]
    if not np.allclose(want, got, atol=1e-5):
        raise RuntimeError(f"{target}: the heavier model answers differently")
    return heavy


@dataclass(frozen=True, slots=True)
class Level:
    layers: int
    active_ms: float
    candidate_ms: float
    raw_pairs_per_s: float
    sustained_rate: float
    """Parts/s: the highest line rate held with the candidate on every part (0: none held)."""
    shadow: PipelineRun | None
    alone: PipelineRun | None
    """At the sustained rate, with the candidate in shadow and without one (medians)."""

    @property
    def pairs_per_s(self) -> float:
        return self.shadow.pairs_per_s if self.shadow else 0.0

    @property
    def ratio(self) -> float:
        return self.pairs_per_s / self.raw_pairs_per_s

    @property
    def latency_factor(self) -> float:
        if self.shadow is None or self.alone is None or not self.alone.active_p99_ms:
            return float("inf")
        return self.shadow.active_p99_ms / self.alone.active_p99_ms


def _pacer(
    args: argparse.Namespace, url: str, broker_pid: int | None, images: Sequence[U8],
    truths: Sequence[str | None], bundles: dict[str, Any], *, shadow: bool,
) -> Callable[[float], PipelineRun]:
    """An agent run at a line rate on these bundles, with the candidate in shadow or none."""
    overrides = bundles if shadow else {k: v for k, v in bundles.items() if k != "candidate"}

    def paced(rate: float) -> PipelineRun:
        return run_pipeline(url, images, truths, shadow=shadow, warmup_s=args.warmup_s,
                            measure_s=args.measure_s, rate_hz=rate, broker_pid=broker_pid,
                            overrides=overrides)

    return paced


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 4, 8],
                        help="extra convolutions per model, one level each")
    parser.add_argument("--parts", type=int, default=400, help="pre-generated synthetic parts")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs with and without the candidate at each level's sustained "
                        "rate; figures are medians over them")
    parser.add_argument("--search-steps", type=int, default=6,
                        help="bisection steps for each level's sustained rate")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--measure-s", type=float, default=6.0)
    args = parser.parse_args(argv)
    if any(n < 0 for n in args.layers):
        parser.error("--layers must be >= 0")
    if args.parts < 50 or args.rounds < 1 or args.search_steps < 1:
        parser.error("--parts must be >= 50, --rounds and --search-steps >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    generator = PartGenerator(7)
    parts = [generator.part(i) for i in range(args.parts)]
    images = [part.image for part in parts]
    truths = [part.defect or "ok" for part in parts]
    print(f"model cost: {args.parts} synthetic parts; active {ACTIVE_BUNDLE.name} and candidate "
          f"{CANDIDATE_BUNDLE.name} with extra layers {args.layers}; load average "
          f"{load_average()[0]:.2f}")
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="bench-model-cost-") as tmp:
        root = Path(tmp)
        private, public = root / "bench.key", root / "bench.pub"
        generate_keypair(private, public)
        broker = start_shipped_broker(root / "broker")
        try:
            for layers in args.layers:
                active = heavier_bundle(ACTIVE_BUNDLE, root / f"active-{layers}", layers, private)
                candidate = heavier_bundle(CANDIDATE_BUNDLE, root / f"candidate-{layers}", layers,
                                           private)
                verify_bundle(active.path.parent, None)
                raw = max(raw_rate(s, active, candidate, images, 3) for s in RAW_SETTINGS)
                bundles = {"active": active.path.parent, "key": public,
                           "candidate": candidate.path.parent}
                with_shadow = _pacer(args, broker.url, broker.pid, images, truths, bundles,
                                     shadow=True)
                alone = _pacer(args, broker.url, broker.pid, images, truths, bundles,
                               shadow=False)
                rate, _, _ = sustained_rate(with_shadow, low=0.0, high=1.05 * raw,
                                            steps=args.search_steps)
                shadow_runs, alone_runs = [], []
                for _ in range(args.rounds if rate else 0):
                    alone_runs.append(alone(rate))
                    shadow_runs.append(with_shadow(rate))
                level = Level(
                    layers, model_latency_ms(active, images)[0],
                    model_latency_ms(candidate, images)[0], raw, rate,
                    _median_run(shadow_runs) if shadow_runs else None,
                    _median_run(alone_runs) if alone_runs else None,
                )
                levels.append(level)
                at_rate = (
                    f"agent {level.pairs_per_s:.0f} pairs/s held at {rate:.0f} parts/s (ratio "
                    f"{level.ratio:.2f}); active p99 there {level.shadow.active_p99_ms:.2f} ms "
                    f"with shadow, {level.alone.active_p99_ms:.2f} alone (factor "
                    f"{level.latency_factor:.2f})"
                    if level.shadow and level.alone else "no line rate held"
                )
                print(f"  +{layers} layers: models {level.active_ms:.2f} + "
                      f"{level.candidate_ms:.2f} ms a pair (p50 alone); raw {raw:.0f} pairs/s; "
                      f"{at_rate}", flush=True)
        finally:
            broker.stop()
    first_met = next((lv for lv in levels if lv.ratio >= TARGET_RATIO), None)
    print(f"sustained pairs / raw >= {TARGET_RATIO} first at "
          + (f"+{first_met.layers} layers, {first_met.active_ms + first_met.candidate_ms:.2f} "
             "ms of model a pair" if first_met else "no level measured"))
    print_json_line({
        "levels": [
            {
                "extra_layers": lv.layers,
                "model_ms_per_pair": round(lv.active_ms + lv.candidate_ms, 3),
                "raw_pairs_per_s": round(lv.raw_pairs_per_s, 1),
                "sustained_parts_per_s": round(lv.sustained_rate, 1),
                "sustained_pairs_per_s": round(lv.pairs_per_s, 1),
                "ratio": round(lv.ratio, 3),
                "active_p99_ms_alone": round(lv.alone.active_p99_ms, 3) if lv.alone else None,
                "active_p99_ms_with_shadow": (
                    round(lv.shadow.active_p99_ms, 3) if lv.shadow else None
                ),
                "latency_factor": round(lv.latency_factor, 3) if lv.shadow else None,
                "owed_after_shutdown": sum(
                    run.owed_after_shutdown for run in (lv.shadow, lv.alone) if run
                ),
            }
            for lv in levels
        ],
        "target_ratio": TARGET_RATIO,
        "target_latency_factor": TARGET_LATENCY_FACTOR,
        "rounds": args.rounds,
        "load_average": round(load_average()[0], 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
