"""`linesight demo`: a whole line on this machine, one process per piece, like a real site.

A mosquitto broker, the fleet controller with its dashboard, three stations on the synthetic
source with their operator screens, and simulated operators that answer each review queue from
the ground truth unless a person answers first. Then a rollout of part-classifier 2.0.0
(`--scenario regressed`: 2.1.0, which the gates catch and roll back).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deploy.client import ControllerClient, ControllerError, ControllerUnavailable, format_rollout
from deploy.fleet_store import SqliteFleetStore
from deploy.rollout import RolloutState
from edge_agent.sources import SourceOptions
from edge_agent.store import StationStore
from linesight.artifacts import generate_keypair
from linesight.broker import Broker, free_port
from linesight.config_file import path_flag
from linesight.demo_models import models_dir, require_bundle
from linesight.sim import SimulatedOperator, summarise
from linesight.stop_signals import (
    STOP_SIGNALS,
    Stopped,
    StopSignals,
    hold_signals,
    signals_deferred,
)
from station_ui.security import hash_pin

ROOT = Path(__file__).resolve().parents[1]
MODELS = models_dir()
STATIONS = ("press-01", "press-02", "press-03")
SCENARIOS = {"good": "2.0.0", "regressed": "2.1.0"}
MARKER = ".linesight-demo"  # in every workdir a demo made: only such a folder is wiped
OPERATOR = ("1001", "Demo operator", "operator", "2468")
SUPERVISOR = ("9001", "Demo supervisor", "supervisor", "1357")


class LineFailed(RuntimeError):
    """A piece of the line died or did not come up; the message says which and where to look."""


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a whole line here: broker, controller, three stations, operator screens",
        description="Start a line on this machine and roll a new model out over it. "
        "Ctrl-C stops everything.",
    )
    demo.add_argument("--scenario", choices=sorted(SCENARIOS), default="good",
                      help="good: roll out 2.0.0 (promoted); regressed: 2.1.0 (rolled back)")
    demo.add_argument("--workdir", type=path_flag, default=Path(".demo"),
                      help="where the demo keeps its data and logs: a new or empty folder, or a "
                      "previous demo's, which is removed at start (default .demo)")
    demo.add_argument("--rate", type=float, default=10.0, help="parts per second per station")
    demo.add_argument("--operator-delay", type=float, default=4.0,
                      help="seconds the simulated operators leave a part for a person")
    demo.add_argument("--exit-when-done", action="store_true",
                      help="stop the line once the rollout has ended (for scripts)")
    demo.add_argument("--timeout", type=float, default=900.0)
    demo.set_defaults(handler=run_demo)


def preferred_port(port: int) -> int:
    """The usual port when it is free, so URLs stay the same between runs; else any."""
    with socket.socket() as probe:
        # Like the servers (waitress, prometheus_client): a port whose last connections linger
        # in TIME_WAIT after the previous run is free for them, so it is for us too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


@dataclass
class Line:
    workdir: Path
    broker: Broker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    operators: list[SimulatedOperator] = field(default_factory=list)

    def start_broker(self) -> Broker:
        # Known to the line before it starts: a Ctrl-C while mosquitto comes up still stops it.
        self.broker = Broker(self.workdir / "broker")
        self.broker.start()
        self._write_pids()
        return self.broker

    def spawn(self, name: str, *args: str) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # A stop signal that arrived while Popen ran would raise before the new process is
        # listed, and the stop would not know it: it waits until the process is listed.
        with signals_deferred():
            with (logs / f"{name}.log").open("ab") as log:
                # A session of its own: the terminal's Ctrl-C reaches the demo only, which then
                # stops every piece in order.
                self.processes[name] = subprocess.Popen(  # noqa: S603 - our own command line
                    [sys.executable, "-m", "linesight.cli", *args],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            self._write_pids()

    def _write_pids(self) -> None:
        pids = {name: process.pid for name, process in self.processes.items()}
        if self.broker is not None and self.broker.pid is not None:
            pids["mosquitto"] = self.broker.pid
        (self.workdir / "processes.json").write_text(json.dumps(pids, indent=2))

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise LineFailed(
                    f"{name} exited with status {process.returncode}; see "
                    f"{self.workdir / 'logs' / (name + '.log')}"
                )

    def stop(self) -> None:
        """Stop every piece, each one even when stopping another failed.

        The pieces run in sessions of their own: one not stopped here keeps running after the
        demo. So a Ctrl-C, SIGTERM or SIGHUP arriving meanwhile is only noted (see `hold_signals`).
        """
        with hold_signals():
            for operator in self.operators:
                _attempt(f"operator {operator.badge}", operator.stop)
            # The stations first, while the controller is there to receipt what they deliver on
            # their way out (their outboxes end empty); then the controller and the screens.
            agents = [name for name in self.processes if name.startswith("agent")]
            self._stop_together(agents)
            self._stop_together([name for name in self.processes if name not in agents])
            if self.broker is not None:
                _attempt("mosquitto", self.broker.stop)

    def _stop_together(self, names: list[str]) -> None:
        for name in names:
            _attempt(name, self.processes[name].terminate)
        for name in names:
            _attempt(name, functools.partial(self._wait_or_kill, name))

    def _wait_or_kill(self, name: str) -> None:
        process = self.processes[name]
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"  {name} did not stop in time; killing it", flush=True)
            process.kill()
            process.wait(timeout=5)


def _attempt(name: str, step: Callable[[], None]) -> None:
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - the other pieces must be stopped all the same
        print(f"  could not stop {name}: {exc}", flush=True)


def _create_operators(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    with StationStore(data_dir) as store:
        for badge, name, role, pin in (OPERATOR, SUPERVISOR):
            store.upsert_operator(badge, name, role, hash_pin(pin))


def run_demo(args: argparse.Namespace) -> int:
    _check_rate(args.rate)
    if not args.timeout > 0:  # also refuses nan
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if not (math.isfinite(args.operator_delay) and args.operator_delay >= 0):
        raise ValueError(
            f"--operator-delay must be a number of seconds >= 0, got {args.operator_delay}"
        )
    version = SCENARIOS[args.scenario]
    for bundle in ("1.0.0", version):
        require_bundle(MODELS / "part-classifier" / bundle)
    workdir = _fresh_workdir(args.workdir.resolve())
    line = Line(workdir)
    # Ctrl-C arrives as KeyboardInterrupt, also when this process was started with SIGINT
    # ignored (a background job of a script inherits that); `kill`, a service manager or a closed
    # terminal send SIGTERM or SIGHUP, whose default would end this process and leave the line
    # running. Only the first one counts: a second Ctrl-C must not cut the stop short.
    signals = StopSignals()
    previous = {sig: signal.signal(sig, signals) for sig in STOP_SIGNALS}
    try:
        return _run(line, args, version)
    except KeyboardInterrupt:
        print("\nstopping the line ...", flush=True)
        return 130
    except LineFailed as exc:
        print(f"linesight demo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Stopped as stopped:
        print(f"\n{signal.Signals(stopped.signum).name}: stopping the line ...", flush=True)
        return 128 + stopped.signum
    finally:
        signals.stopping = True
        try:
            line.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"stopped; data and logs are in {workdir}", flush=True)


def _check_rate(rate: float) -> None:
    """Refuse a --rate the stations' synthetic source would refuse, before the line starts."""
    try:
        SourceOptions(rate_hz=rate)
    except ValidationError as exc:
        raise ValueError(
            f"--rate must be a number of parts per second a station takes, not {rate:g}: "
            f"{exc.errors()[0]['msg']}"
        ) from exc


def _fresh_workdir(workdir: Path) -> Path:
    """`workdir` emptied for a new run: new, empty, or a previous demo's (which is removed).
    Any other folder is refused, so that a mistyped --workdir deletes nothing of the user's."""
    if workdir.exists() or workdir.is_symlink():
        if not workdir.is_dir() or workdir.is_symlink():
            raise ValueError(f"--workdir {workdir} is not a folder (or is a symbolic link)")
        # Demos before the marker left processes.json and logs/ behind.
        made_by_demo = (workdir / MARKER).is_file() or (
            (workdir / "processes.json").is_file() and (workdir / "logs").is_dir())
        if made_by_demo:
            print(f"removing the previous demo's data in {workdir}", flush=True)
            shutil.rmtree(workdir)
        elif any(workdir.iterdir()):
            raise ValueError(
                f"--workdir {workdir} holds files that no demo made; the demo empties its "
                "workdir at start, so give it a new or empty folder"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by 'linesight demo'; emptied by the next run\n")
    return workdir


def _run(line: Line, args: argparse.Namespace, version: str) -> int:
    workdir = line.workdir
    key = str(MODELS / "keys" / "demo.pub")
    # Commands are signed end to end, with a key pair made for this run of the demo.
    command_key, command_pub = workdir / "keys" / "command.key", workdir / "keys" / "command.pub"
    generate_keypair(command_key, command_pub)
    broker = line.start_broker()
    http_port = preferred_port(8700)
    controller_url = f"http://127.0.0.1:{http_port}"
    line.spawn("controller", "fleet", "serve", "--broker", broker.url,
               "--data-dir", str(workdir / "fleet"), "--bundles", str(MODELS), "--key", key,
               "--command-key", str(command_key),
               "--http-port", str(http_port))
    ui_urls: dict[str, str] = {}
    for index, station in enumerate(STATIONS):
        data_dir = workdir / station
        _create_operators(data_dir)
        line.spawn(
            f"agent-{station}", "agent", "--station", station, "--broker", broker.url,
            "--source", f"synthetic:seed={101 + index},rate={args.rate:g}",
            "--active", str(MODELS / "part-classifier" / "1.0.0"), "--automation", "partial",
            "--data-dir", str(data_dir), "--key", key, "--command-key", str(command_pub),
            "--metrics-port", str(preferred_port(9101 + index)),
        )
        ui_port = preferred_port(8801 + index)
        line.spawn(f"ui-{station}", "ui", "--data-dir", str(data_dir), "--port", str(ui_port))
        ui_urls[station] = f"http://127.0.0.1:{ui_port}"
        line.operators.append(SimulatedOperator(
            data_dir, error_rate=0.01, seed=index, badge=f"sim-{station}",
            delay_s=args.operator_delay,
        ).start())
    client = ControllerClient(controller_url)
    _wait_for_stations(client, line)
    print(f"""
Linesight demo: one broker, one fleet controller, {len(STATIONS)} stations.
  fleet dashboard   {controller_url}/
  station screens   {'  '.join(f'{s} {u}/' for s, u in ui_urls.items())}
  sign in           operator badge {OPERATOR[0]} PIN {OPERATOR[3]}, supervisor {SUPERVISOR[0]} \
PIN {SUPERVISOR[3]}
  broker            {broker.url}
  logs              {workdir / 'logs'}
Simulated operators answer each review queue after {args.operator_delay:g} s unless you answer
first on a station screen. Ctrl-C stops everything.
""", flush=True)
    plan = (ROOT / "deploy" / "plans" / "demo.yaml").read_text()
    started = client.start_rollout(plan, "part-classifier", version, by="demo")
    print(f"rollout {started['rollout_id']}: part-classifier {version} over "
          f"{', '.join(STATIONS)}\n", flush=True)
    doc = _follow(client, line, args.timeout)
    _print_summary(line, doc)
    if args.exit_when_done:
        return 0 if doc is not None else 1
    print("\nThe line keeps running: look around, then press Ctrl-C to stop it.", flush=True)
    while True:
        time.sleep(1)
        line.check_alive()


def _wait_for_stations(client: ControllerClient, line: Line) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line.check_alive()
        try:
            stations = client.get("/api/stations")["stations"]
            if sum(1 for s in stations if s["online"]) == len(STATIONS):
                return
        except (ControllerUnavailable, ControllerError):
            pass
        time.sleep(0.5)
    raise LineFailed("the stations did not come online within 60 s; see the logs")


def _follow(client: ControllerClient, line: Line, timeout: float) -> dict[str, Any] | None:
    """The stage table whenever a stage or the phase changes; one evidence line in between."""
    deadline = time.monotonic() + timeout
    shown_stage: tuple[object, ...] = ()
    last_line = 0.0
    while time.monotonic() < deadline:
        line.check_alive()
        doc = client.current()
        if doc is not None:
            stage = (doc["phase"], doc["stage"], tuple(s["status"] for s in doc["stages"]))
            if stage != shown_stage:
                print(format_rollout(doc) + "\n", flush=True)
                shown_stage = stage
                last_line = time.monotonic()
            elif time.monotonic() - last_line >= 6 and doc.get("evidence"):
                print(_evidence_line(doc), flush=True)
                last_line = time.monotonic()
            if doc["phase"] in ("promoted", "rolled_back", "aborted", "paused"):
                return doc
        time.sleep(2)
    print(f"the rollout did not end within {timeout:g} s", flush=True)
    return None


def _evidence_line(doc: dict[str, Any]) -> str:
    evidence = doc["evidence"]
    agreement = evidence["agreement_rate"]
    text = (
        f"  stage {doc['stage'] + 1}: parts {evidence['parts']}/{evidence['min_parts']}, "
        f"labelled disagreements {evidence['labelled_disagreements']}/"
        f"{evidence['min_labelled_disagreements']}"
    )
    if agreement is not None:
        text += f", agreement {agreement:.1%}"
    if evidence["error_diff_estimate"] is not None:
        text += f", error difference {evidence['error_diff_estimate']:+.2%}"
    return text + f", gate {evidence['gate']}, escape gate {evidence['escape_gate']}"


def _print_summary(line: Line, doc: dict[str, Any] | None) -> None:
    if doc is None:
        return
    store = SqliteFleetStore(line.workdir / "fleet" / "fleet.db")
    try:
        stored = store.rollout(str(doc["rollout_id"]))
        rollout = RolloutState.model_validate_json(stored) if stored else None
        labels = sum(operator.answered for operator in line.operators)
        summary = summarise(store, rollout, SimulatedOperator(line.workdir).truth, labels)
    finally:
        store.close()
    print("summary")
    print(f"  outcome              {summary.outcome} after {summary.seconds_to_decision} s: "
          f"{summary.reason}")
    print(f"  stages passed        {summary.stages_passed}")
    print(f"  parts inspected      {summary.parts} "
          f"({summary.parts_decided_by_candidate} decided by the candidate)")
    print(f"  escaped defects      active {summary.escaped_defects['active']}, "
          f"candidate {summary.escaped_defects['candidate']}")
    print(f"  false rejects        active {summary.false_rejects['active']}, "
          f"candidate {summary.false_rejects['candidate']}")
    print(f"  operator labels      {summary.labels_used} (simulated operators)")
    print(json.dumps({"summary": json.loads(summary.to_json())}), flush=True)
