"""The fleet simulation (front door).

Its simulated operators, used by the demo and the tests too, answer a station's review queue
from the synthetic parts' ground truth, with a configurable error rate, through the same local
store the station UI writes to."""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from deploy.api import create_app
from deploy.config import load_controller_config
from deploy.controller import Controller
from deploy.fleet_store import FleetStore
from deploy.plan import RolloutPlan, load_plan
from deploy.rollout import TERMINAL, Phase, RolloutState
from edge_agent.agent import Agent
from edge_agent.config import load_config as load_agent_config
from edge_agent.store import StationStore
from edge_agent.synthetic import PartGenerator, parse_part_id
from linesight.artifacts import Manifest, load_public_key, verify_bundle
from linesight.broker import free_port, start_broker
from linesight.config_file import path_flag
from linesight.demo_models import models_dir, require_bundle
from linesight.http_server import HttpServer
from linesight.protocol import Action, DecidedBy
from linesight.stop_signals import STOP_SIGNALS, Stopped, StopSignals

log = logging.getLogger(__name__)


class SimulatedOperator:
    def __init__(
        self,
        data_dir: Path,
        *,
        defect_rate: float = 0.3,
        error_rate: float = 0.0,
        seed: int = 0,
        badge: str = "sim-operator",
        interval_s: float = 0.2,
        delay_s: float = 0.0,
    ) -> None:
        self.data_dir = data_dir
        self.defect_rate = defect_rate
        self.error_rate = error_rate
        self.badge = badge
        self.interval_s = interval_s
        self.delay_s = delay_s
        self.answered = 0
        self._random = random.Random(seed)  # noqa: S311 - simulation, not security
        self._generators: dict[int, PartGenerator] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def truth(self, part_id: str) -> str:
        seed, index = parse_part_id(part_id)
        generator = self._generators.setdefault(seed, PartGenerator(seed, self.defect_rate))
        return "defect" if generator.defect(index) is not None else "ok"

    def answer_pending(self, store: StationStore) -> int:
        """Judge every part waiting long enough; a person in the UI may have answered first."""
        answered = 0
        now = datetime.now(UTC)
        for item in store.pending_reviews(limit=200):
            if (now - item.created).total_seconds() < self.delay_s:
                continue
            try:
                label = self.truth(item.part_id)
            except ValueError:
                continue  # not a synthetic part: leave it to a person
            if self._random.random() < self.error_rate:
                label = "ok" if label == "defect" else "defect"
            outcome = "reject" if label == "defect" else "pass"
            if store.record_verdict(item.part_id, self.badge, outcome, label, now):
                answered += 1
        self.answered += answered
        return answered

    def start(self) -> SimulatedOperator:
        self._thread = threading.Thread(target=self._run, name=f"operator-{self.badge}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        store = StationStore(self.data_dir)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.answer_pending(store)
                except Exception:  # keep answering; the store may be busy  # noqa: BLE001
                    log.exception("simulated operator %s failed", self.badge)
        finally:
            store.close()


# --- the outcome of a rollout on a simulated line --------------------------------------------


# What a summary calls a rollout's end, by its phase; a rollout in any other phase (running,
# rolling back) had not ended when the summary was made: "timed_out".
OUTCOMES = {
    Phase.PROMOTED: "promoted", Phase.ROLLED_BACK: "rolled_back", Phase.ABORTED: "rolled_back",
    Phase.PAUSED: "paused", Phase.WAITING_APPROVAL: "waiting_approval",
}
# `linesight sim`'s exit status by outcome: 0 a decision (promoted or rolled back), 3 the rollout
# waits for a person (paused, or a stage passed and waits for approval), 4 no decision in time.
EXIT_STATUS = {"promoted": 0, "rolled_back": 0, "paused": 3, "waiting_approval": 3}
EXIT_TIMED_OUT = 4


@dataclass(frozen=True, slots=True)
class LineSummary:
    outcome: str
    phase: str | None  # the rollout's phase at the end, e.g. "running" when it timed out
    stages_passed: int
    parts: int
    parts_decided_by_candidate: int
    escaped_defects: dict[str, int]
    false_rejects: dict[str, int]
    labels_used: int
    seconds_to_decision: float | None
    reason: str

    def to_json(self) -> str:
        document = asdict(self)
        document.pop("reason")
        return json.dumps(document, sort_keys=False)


def summarise(
    store: FleetStore, rollout: RolloutState | None, truth: Callable[[str], str],
    labels_used: int,
) -> LineSummary:
    """Escaped defects are defective parts a model passed; false rejects good parts it
    rejected; each is attributed to the model that decided the part."""
    escaped = {"active": 0, "candidate": 0}
    false_rejects = {"active": 0, "candidate": 0}
    decisions = store.decisions()
    for decision in decisions:
        who = decision.decided_by.value
        if who not in escaped:
            continue
        actual = truth(decision.part_id)
        if decision.action == Action.PASS and actual == "defect":
            escaped[who] += 1
        elif decision.action == Action.REJECT and actual == "ok":
            false_rejects[who] += 1
    if rollout is None:
        return LineSummary("none", None, 0, len(decisions), 0, escaped, false_rejects,
                           labels_used, None, "no rollout ran")
    outcome = OUTCOMES.get(rollout.phase, "timed_out")
    seconds = (
        (rollout.updated - rollout.started).total_seconds() if rollout.phase in TERMINAL else None
    )
    reason = rollout.reason
    if rollout.phase == Phase.WAITING_APPROVAL:
        reason = f"stage {rollout.current.name!r} passed and waits for a person's approval"
    elif outcome == "timed_out":
        reason = f"no decision in time: the rollout was still {rollout.phase.value}"
    return LineSummary(
        outcome=outcome,
        phase=rollout.phase.value,
        stages_passed=sum(1 for record in rollout.stages if record.outcome == "passed"),
        parts=len(decisions),
        parts_decided_by_candidate=sum(
            1 for d in decisions if d.decided_by == DecidedBy.CANDIDATE
        ),
        escaped_defects=escaped,
        false_rejects=false_rejects,
        labels_used=labels_used,
        seconds_to_decision=round(seconds, 1) if seconds is not None else None,
        reason=reason,
    )


# --- `linesight sim` -----------------------------------------------------------------------

DEFAULT_PLAN = Path(__file__).resolve().parents[1] / "deploy" / "plans" / "shadow-first.yaml"
MODELS = models_dir()
MAX_STATIONS = 50
MAX_RATE = 10_000.0  # what a synthetic source takes (its rate_hz)
# Station i's source seed is seed * 100 + i, which a synthetic source takes up to 2**63 - 1.
MAX_SEED = (2**63 - 1 - (MAX_STATIONS - 1)) // 100


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser(
        "sim",
        help="run a rollout on a simulated line, headless, and print its outcome",
        description="A broker, the controller, N stations on the synthetic source and "
        "simulated operators, all on this machine; ends with one JSON line.",
        epilog="Exit status: 0 the rollout was promoted or rolled back; 3 it waits for a person "
        "(paused, or waiting for an approval); 4 it had not ended at --timeout; 2 an error.",
    )
    sim.add_argument("--stations", type=int, default=3)
    sim.add_argument("--candidate", type=path_flag, required=True,
                     help="bundle folder, e.g. models/part-classifier/2.1.0")
    sim.add_argument("--active", type=path_flag, default=MODELS / "part-classifier" / "1.0.0")
    sim.add_argument("--plan", type=path_flag, default=DEFAULT_PLAN)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--rate", type=float, default=40.0, help="parts per second per station")
    sim.add_argument("--operator-error", type=float, default=0.01,
                     help="share of verdicts the simulated operators get wrong")
    sim.add_argument("--timeout", type=float, default=900.0, help="give up after this long")
    sim.add_argument("--key", type=path_flag, default=MODELS / "keys" / "demo.pub")
    sim.add_argument("--json", action="store_true", help="only the final JSON line on stdout")
    sim.set_defaults(handler=run_sim)


def run_sim(args: argparse.Namespace) -> int:
    if not 1 <= args.stations <= MAX_STATIONS:
        raise ValueError(f"--stations must be between 1 and {MAX_STATIONS}")
    if not (math.isfinite(args.rate) and 0 < args.rate <= MAX_RATE):
        raise ValueError(f"--rate must be a number > 0 and at most {MAX_RATE:g}, got {args.rate}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if not 0 <= args.operator_error <= 1:  # also refuses nan
        raise ValueError(f"--operator-error must be between 0 and 1, got {args.operator_error}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    require_bundle(args.active)
    manifest = verify_bundle(args.candidate, load_public_key(args.key))
    plan = load_plan(args.plan)
    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    # SIGTERM or SIGHUP would end the interpreter at once and leave the simulation's broker
    # running (a session of its own) and its folder behind: they end the run like Ctrl-C.
    signals = StopSignals()
    previous = {sig: signal.signal(sig, signals) for sig in STOP_SIGNALS}
    try:
        with tempfile.TemporaryDirectory(prefix="linesight-sim-") as workdir:
            bundles = served_bundles(args.candidate, manifest, Path(workdir))
            summary = simulate(
                Path(workdir), plan=plan, candidate=(bundles, manifest.name, manifest.version),
                active=args.active, key=args.key, stations=args.stations, seed=args.seed,
                rate=args.rate, operator_error=args.operator_error, timeout_s=args.timeout,
                say=say,
            )
    except Stopped as stopped:
        print(f"{signal.Signals(stopped.signum).name}: the simulation was stopped",
              file=sys.stderr, flush=True)
        return 128 + stopped.signum
    finally:
        signals.stopping = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say(f"{summary.outcome}: {summary.reason}")
    print(summary.to_json(), flush=True)
    return EXIT_STATUS.get(summary.outcome, EXIT_TIMED_OUT)


def served_bundles(candidate: Path, manifest: Manifest, workdir: Path) -> Path:
    """The folder the controller serves `candidate` from, as <folder>/<name>/<version>: its
    own grandparent when it sits there, else a copy in `workdir` (never another bundle that
    has the same name and version)."""
    root = candidate.parent.parent
    if (root / manifest.name / manifest.version).resolve() == candidate.resolve():
        return root
    copy = workdir / "bundles" / manifest.name / manifest.version
    shutil.copytree(candidate, copy)
    return copy.parent.parent


def simulate(
    workdir: Path, *, plan: RolloutPlan, candidate: tuple[Path, str, str], active: Path,
    key: Path, stations: int, seed: int, rate: float, operator_error: float, timeout_s: float,
    say: Callable[[str], None],
) -> LineSummary:
    """Run one rollout on a simulated line in this process and summarise it."""
    bundles, name, version = candidate
    defect_rate = 0.3
    with start_broker(workdir / "broker") as broker:
        controller = Controller(load_controller_config(None, {
            "broker.url": broker.url, "data_dir": workdir / "fleet", "bundles": bundles,
            "key": key, "http_port": free_port(), "tick_s": 0.5,
        }))
        server = HttpServer(create_app(controller), "127.0.0.1", controller.config.http_port)
        controller.start()
        server.start()
        agents: list[Agent] = []
        threads: list[threading.Thread] = []
        operators: list[SimulatedOperator] = []
        ended: RolloutState | None = None
        try:
            for index in range(stations):
                station = f"sim-{index + 1:02d}"
                data_dir = workdir / station
                agent = Agent(load_agent_config(None, {
                    "station": station, "broker.url": broker.url,
                    "source": f"synthetic:seed={seed * 100 + index},rate={rate:g},"
                              f"defect_rate={defect_rate}",
                    "active": active, "data_dir": data_dir, "key": key,
                    "automation": "partial", "state_interval_s": 2.0,
                    "metrics_interval_s": 5.0, "outbox.resend_after_s": 5.0,
                }))
                agents.append(agent)
                thread = threading.Thread(target=agent.run, name=station, daemon=True)
                thread.start()
                threads.append(thread)
                operators.append(SimulatedOperator(
                    data_dir, defect_rate=defect_rate, error_rate=operator_error,
                    seed=seed * 1000 + index, badge=f"sim-op-{index + 1:02d}",
                ).start())
            deadline = time.monotonic() + 30
            while len(controller.fleet()) < stations and time.monotonic() < deadline:
                time.sleep(0.1)
            controller.start_rollout(plan, name, version, by="sim")
            say(f"rollout of {name} {version} with plan {plan.name} on {stations} stations")
            deadline = time.monotonic() + timeout_s
            last = ""
            while time.monotonic() < deadline:
                state = controller.rollout
                if state is not None:
                    line = f"  {state.phase.value}: stage {state.stage + 1} {state.current.name}"
                    if line != last:
                        say(line)
                        last = line
                    # Paused or waiting for approval, it waits for a person, who is not there.
                    if state.phase in OUTCOMES:
                        break
                time.sleep(0.5)
            # As it was when we stopped waiting: stopping the stations below can still change it
            # (stations going away in the middle of a stage can start a rollback).
            ended = controller.rollout
        finally:
            for agent in agents:
                agent.stop()
            for thread in threads:
                thread.join(60)
            for operator in operators:
                operator.stop()
            time.sleep(1.0)  # the last receipts and acks reach the store
            server.stop()
        labels = sum(operator.answered for operator in operators)
        judge = SimulatedOperator(workdir, defect_rate=defect_rate)
        summary = summarise(controller.store, ended, judge.truth, labels)
        controller.stop()
    return summary
