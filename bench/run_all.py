"""Run every benchmark, collect each one's final JSON line and (re)write docs/benchmarks.md.

Each benchmark runs as its own subprocess with a time limit; one that fails or times out is
reported as such in the page and in the exit status, and the others still run.

Run: .venv/bin/python -m bench.run_all  (or .venv/bin/python bench/run_all.py)
     [--only NAME ...] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, load_average, machine

Summary = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    value: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: informative, no target


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    module: str
    args: tuple[str, ...]
    timeout_s: float
    what: str
    rows: Callable[[Summary], list[Row]]


def _yes(met: bool | None) -> str:
    return "—" if met is None else ("**yes**" if met else "**no**")


def _agent_rows(s: Summary) -> list[Row]:
    raw, naive, pipe = s["raw_pairs_per_s"], s["naive_pairs_per_s"], s["pipeline_pairs_per_s"]
    alone, shadow = s["active_p99_ms_alone"], s["active_p99_ms_with_shadow"]
    factor = shadow / alone if alone else float("inf")
    return [
        Row("agent pipeline, pairs/s (candidate in shadow)", f"{pipe:.0f}",
            f"raw onnxruntime, best setting: {raw:.0f}", f"{s['ratio']:.2f}", ">= 0.90",
            s["ratio"] >= 0.9),
        Row("naive onnxruntime (default options), pairs/s", f"{naive:.0f}",
            f"raw onnxruntime, best setting: {raw:.0f}", f"{naive / raw:.2f}", "—", None),
        Row("active p99 latency with the candidate in shadow, flat out", f"{shadow:.2f} ms",
            f"no candidate: {alone:.2f} ms", f"{factor:.2f}", "<= 1.20", factor <= 1.2),
        *_sustained_rows(s),
        *_bound_rows(s),
        *_equal_priority_rows(s),
        *_line_rate_rows(s),
    ]


def _sustained_rows(s: Summary) -> list[Row]:
    """Pairs/s at the highest line rate held with the candidate on every part."""
    if "sustained_pairs_per_s" not in s:
        return []
    raw, pairs, ratio = s["raw_pairs_per_s"], s["sustained_pairs_per_s"], s["sustained_ratio"]
    return [Row(
        "agent pipeline, pairs/s at the highest line rate it holds with the candidate on every "
        "part (bisection of paced runs)", f"{pairs:.0f}",
        f"raw onnxruntime, best setting: {raw:.0f}", f"{ratio:.2f}", ">= 0.90", ratio >= 0.9,
    )]


def _bound_rows(s: Summary) -> list[Row]:
    """What no agent could beat here: the models plus the helpers' CPU per message."""
    if "ratio_bound_free_agent" not in s:
        return []
    raw, bound = s["raw_pairs_per_s"], s["ratio_bound_free_agent"]
    return [Row(
        "(bound) pairs/s of an agent that cost no CPU at all, beside this broker and receipting "
        f"subscriber ({s['helper_cpu_ms_per_message']:.3f} ms of CPU per message)",
        f"{bound * raw:.0f}", f"raw onnxruntime, best setting: {raw:.0f}", f"{bound:.2f}",
        "—", None,
    )]


def _equal_priority_rows(s: Summary) -> list[Row]:
    """The candidate at the agent's own CPU priority (candidate_nice 0): the trade shown."""
    if "pipeline_pairs_per_s_equal_priority" not in s:
        return []
    raw, alone = s["raw_pairs_per_s"], s["active_p99_ms_alone"]
    pairs = s["pipeline_pairs_per_s_equal_priority"]
    p99 = s["active_p99_ms_with_shadow_equal_priority"]
    return [
        Row("(same, candidate at equal CPU priority) pairs/s", f"{pairs:.0f}",
            f"raw onnxruntime, best setting: {raw:.0f}", f"{pairs / raw:.2f}", "—", None),
        Row("(same, candidate at equal CPU priority) active p99, flat out", f"{p99:.2f} ms",
            f"no candidate: {alone:.2f} ms", f"{p99 / alone:.2f}" if alone else "—", "—", None),
    ]


def _line_rate_rows(s: Summary) -> list[Row]:
    """The same latency comparison at a paced line rate, where inspection is not saturated."""
    if "active_p99_ms_alone_at_line_rate" not in s:
        return []
    alone = s["active_p99_ms_alone_at_line_rate"]
    shadow = s["active_p99_ms_with_shadow_at_line_rate"]
    factor = shadow / alone if alone else float("inf")
    rows = [Row(
        f"active p99 latency with the candidate in shadow, at {s['line_rate']:g} parts/s "
        f"({s['skipped_at_line_rate']:g} candidate skips/s)", f"{shadow:.2f} ms",
        f"no candidate: {alone:.2f} ms", f"{factor:.2f}", "<= 1.20", factor <= 1.2,
    )]
    if "active_p99_ms_paced_floor" in s:
        floor = s["active_p99_ms_paced_floor"]
        rows.append(Row(
            f"active model alone in a bare loop at {s['line_rate']:g} parts/s (the machine's "
            "floor)", f"{floor:.2f} ms", f"agent, no candidate: {alone:.2f} ms",
            f"{floor / alone:.2f}" if alone else "—", "—", None,
        ))
    return rows


def _controller_rows(s: Summary) -> list[Row]:
    offered, ingest, raw = (s["offered_msgs_per_s"], s["ingest_msgs_per_s"],
                            s["raw_delivery_msgs_per_s"])
    lag, raw_lag = s["receipt_lag_p99_s"], s["raw_lag_p99_s"]
    return [
        Row("controller ingest, stored msg/s", f"{ingest:.0f}",
            f"raw Mosquitto delivery: {raw:.0f} (offered {offered:.0f})",
            f"{ingest / raw:.2f}" if raw else "—", f">= {offered:.0f} (offered)",
            ingest >= 0.98 * offered),
        Row("p99 publish-to-receipt lag", f"{lag:.3f} s",
            f"raw publish-to-delivery p99: {raw_lag:.4f} s",
            f"{lag / raw_lag:.0f}" if raw_lag else "—", "< 1 s", lag < 1.0),
        Row("messages never receipted", str(s["dropped"]),
            f"raw: never delivered {s.get('raw_dropped', '?')}", "—", "0", s["dropped"] == 0),
    ]


def _gate_rows(s: Summary) -> list[Row]:
    return [
        Row("gate false promotion (worse by delta)", f"{s['false_promotion']:.3f}",
            f"peeking z-test: {s['naive_peeking_false_promotion']:.3f}", "—", "<= alpha (0.05)",
            s["false_promotion"] <= 0.05),
        Row("gate false rollback (equal)", f"{s['false_rollback']:.3f}", "—", "—",
            "<= beta (0.2)", s["false_rollback"] <= 0.2),
        Row("labels needed vs fixed-sample test", f"{s['labels_vs_fixed']:.2f} x",
            f"fixed-sample test: {s['fixed_sample_size']} labels", f"{s['labels_vs_fixed']:.2f}",
            "<= 0.70", s["labels_vs_fixed"] <= 0.7),
    ]


def _model_cost_rows(s: Summary) -> list[Row]:
    rows = []
    for level in s["levels"]:
        factor = level["latency_factor"]
        rows.append(Row(
            f"+{level['extra_layers']} layers, {level['model_ms_per_pair']:.2f} ms of model a "
            f"pair: pairs/s held with the candidate on every part (at that rate, active p99 "
            f"with shadow / alone: {'—' if factor is None else f'{factor:.2f}'})",
            f"{level['sustained_pairs_per_s']:.0f}",
            f"raw onnxruntime: {level['raw_pairs_per_s']:.0f}", f"{level['ratio']:.2f}",
            ">= 0.90 (shipped models only)", None,
        ))
    return rows


BENCHMARKS = (
    Benchmark(
        "agent_throughput", "bench.agent_throughput", (), 600,
        "Pairs of inferences per second on 600 pre-generated synthetic parts: raw onnxruntime "
        "(best setting of a small search), onnxruntime defaults, and a real agent (candidate in "
        "shadow, outbox with group commit, MQTT to a real Mosquitto, receipts from a subscriber "
        "in its own process), flat out and at a line rate. The agent runs with and without the "
        "candidate take turns for three rounds; every agent figure is the median over them. The "
        "candidate runs at a lower CPU priority (inference.candidate_nice 10); one run at equal "
        "priority shows the trade. Flat out the candidate skips most parts by design, so a "
        "bisection of paced runs also finds the highest line rate the agent holds with the "
        "candidate on every part (the sustained row). The bound row is what an agent that cost "
        "no CPU at all could reach here, where the broker and the receipting subscriber share "
        "the cores.",
        _agent_rows,
    ),
    Benchmark(
        "model_cost", "bench.model_cost", (), 1500,
        "Where the agent's own cost stops mattering: both shipped models with N extra "
        "convolutions in a branch multiplied by zero (the same answers, more work), signed for "
        "the run. Per level: raw onnxruntime (best of four settings) and the highest line rate "
        "a real agent holds with the candidate in shadow on every part (bisection of paced "
        "runs), and there the active p99 with and without the candidate (medians of two runs). "
        "Informative: the targets are the agent benchmark's, on the shipped models.",
        _model_cost_rows,
    ),
    Benchmark(
        "controller_ingest", "bench.controller_ingest", (), 900,
        "1,000 simulated stations x 2 msg/s (Decision + ShadowResult, QoS 1) for 30 s through "
        "Mosquitto with deploy/mosquitto.conf's settings into a real Controller; baseline: the "
        "same load to a subscriber that only counts.",
        _controller_rows,
    ),
    Benchmark(
        "gate_quality", "bench.gate_quality", (), 900,
        "Thousands of simulated rollouts: the sequential gate against a fixed-sample test and a "
        "peeking test on the same streams.",
        _gate_rows,
    ),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    benchmark: Benchmark
    summary: Summary | None
    error: str | None
    seconds: float
    load_before: float


def run_one(benchmark: Benchmark) -> Outcome:
    load_before = load_average()[0]
    start = time.monotonic()
    print(f"== {benchmark.name} (limit {benchmark.timeout_s:.0f} s)", flush=True)
    try:
        result = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", benchmark.module, *benchmark.args],
            cwd=REPO, capture_output=True, text=True, timeout=benchmark.timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        return Outcome(benchmark, None, f"timed out after {benchmark.timeout_s:.0f} s",
                       time.monotonic() - start, load_before)
    seconds = time.monotonic() - start
    print(result.stdout, end="", flush=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout)[-1500:]
        return Outcome(benchmark, None, f"exit status {result.returncode}: {tail}", seconds,
                       load_before)
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        return Outcome(benchmark, None, f"last line is not JSON: {lines[-1][:200]}", seconds,
                       load_before)
    return Outcome(benchmark, summary, None, seconds, load_before)


def render(outcomes: Sequence[Outcome], host: dict[str, Any], when: datetime) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run_all.py`; do not edit by hand. Every figure is compared with a",
        "baseline measured in the same run on the same machine. Run them all (about 15 minutes)",
        "and rewrite this page with:",
        "",
        "```sh",
        ".venv/bin/python -m bench.run_all        # or: .venv/bin/python bench/run_all.py",
        ".venv/bin/python -m bench.run_all --only agent_throughput   # one benchmark",
        "```",
        "",
        "Each benchmark also runs on its own (`.venv/bin/python -m bench.<name> --help`) and ends",
        "with one JSON line. Run them on a quiet machine: the load average before each run is",
        "recorded below, and anything above the core count makes the figures pessimistic.",
        "What the findings mean and what to change: docs/decisions/0007-performance.md.",
        "",
        f"Run on {when:%Y-%m-%d %H:%M} UTC.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {host['cpu']} |",
        f"| cores | {host['cores']} |",
        f"| memory | {host['memory_gib']} GiB |",
        f"| OS | {host['os']} |",
        f"| Python | {host['python']} |",
        f"| onnxruntime | {host['onnxruntime']} |",
        f"| paho-mqtt / pydantic | {host['paho_mqtt']} / {host['pydantic']} |",
        f"| Mosquitto | {host['mosquitto']} |",
        "",
    ]
    for outcome in outcomes:
        benchmark = outcome.benchmark
        lines += [f"## {benchmark.name}", "", benchmark.what, ""]
        lines.append(f"`python -m {benchmark.module}` took {outcome.seconds:.0f} s; load average "
                     f"before it {outcome.load_before:.2f}.")
        lines.append("")
        if outcome.summary is None:
            lines += [f"**Failed**: {outcome.error}", ""]
            continue
        lines += [
            "| figure | measured | baseline (same run) | ratio | target | met |",
            "|---|---|---|---|---|---|",
        ]
        for row in benchmark.rows(outcome.summary):
            lines.append(f"| {row.figure} | {row.value} | {row.baseline} | {row.ratio} | "
                         f"{row.target} | {_yes(row.met)} |")
        lines += ["", "Final JSON line:", "", "```json", json.dumps(outcome.summary), "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=names, help="run only these benchmarks")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    outcomes = [run_one(benchmark) for benchmark in chosen]
    args.output.write_text(render(outcomes, machine(), datetime.now(UTC)))
    print(f"wrote {args.output}")
    failed = [o.benchmark.name for o in outcomes if o.summary is None]
    missed = [
        o.benchmark.name for o in outcomes
        if o.summary is not None and any(row.met is False for row in o.benchmark.rows(o.summary))
    ]
    if failed:
        print(f"failed: {', '.join(failed)}")
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
