"""The `linesight` command: the front door to every process of the appliance."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linesight import __version__
from linesight.config_file import path_flag
from linesight.demo import add_command as add_demo_command
from linesight.sim import add_command as add_sim_command
from station_ui.commands import register as register_station_ui

if TYPE_CHECKING:
    from deploy.client import ControllerClient
    from edge_agent.config import AgentConfig

Handler = Callable[[argparse.Namespace], int]


EXIT_NOT_DONE = 2
"""What was asked was not done: a mistake in what the user typed, no controller (or something
else) at its address, or the controller refused it."""
EXIT_MAYBE_DONE = 3
"""A request that changes something went out but got no answer: it may still happen."""


EXIT_STATUS_TEXT = (
    f"exit status: 0 done; {EXIT_NOT_DONE} not done (a mistake in the arguments, no controller "
    f"at the address, or the controller refused); {EXIT_MAYBE_DONE} the request went out but no "
    "answer came: it may still happen, 'linesight fleet rollout status' shows whether it did"
)


class UsageError(Exception):
    """A mistake in what the user typed; printed without a traceback, exit status 2."""


def _add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser(
        "models",
        help="create keys, sign, verify, list and evaluate model bundles",
        description="Model bundles: a folder with model.onnx, manifest.json and manifest.sig.",
    )
    verbs = models.add_subparsers(dest="verb", metavar="VERB", required=True)

    keygen = verbs.add_parser("keygen", help="write a new Ed25519 key pair (PEM)")
    keygen.add_argument("--private", type=path_flag, required=True,
                        help="private key file to create")
    keygen.add_argument("--public", type=path_flag, required=True,
                        help="public key file to create")
    keygen.set_defaults(handler=_models_keygen)

    sign = verbs.add_parser(
        "sign", help="refresh the digests of a bundle's files and sign its manifest"
    )
    sign.add_argument("bundle", type=path_flag, help="bundle folder")
    sign.add_argument("--key", type=path_flag, required=True, help="Ed25519 private key (PEM)")
    sign.set_defaults(handler=_models_sign)

    verify = verbs.add_parser(
        "verify", help="check a bundle's schema, digests, sizes, external data and signature"
    )
    verify.add_argument("bundle", type=path_flag, nargs="+", help="bundle folder(s)")
    verify.add_argument(
        "--key", type=path_flag,
        help="Ed25519 public key (PEM); without it the signature is not checked",
    )
    verify.set_defaults(handler=_models_verify)

    listing = verbs.add_parser("list", help="list the bundles below a folder")
    listing.add_argument("root", type=path_flag, nargs="?", default=Path("models"))
    listing.add_argument("--json", action="store_true", help="one JSON object per bundle")
    listing.set_defaults(handler=_models_list)

    evaluate = verbs.add_parser(
        "evaluate", help="measure accuracy, defect recall and false rejects on held-out parts"
    )
    evaluate.add_argument("bundle", type=path_flag)
    evaluate.add_argument("--seed", type=int, help="held-out seed (default: the manifest's)")
    evaluate.add_argument("--size", type=int, help="number of parts (default: the manifest's)")
    evaluate.add_argument("--defect-rate", type=float, default=None)
    evaluate.add_argument("--key", type=path_flag, help="verify the signature with this public key")
    evaluate.set_defaults(handler=_models_evaluate)


def _models_keygen(args: argparse.Namespace) -> int:
    from linesight.artifacts import generate_keypair

    try:
        generate_keypair(args.private, args.public)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.private} (keep it secret) and {args.public}")
    return 0


def _models_sign(args: argparse.Namespace) -> int:
    from linesight.artifacts import load_private_key, resign_bundle

    manifest = resign_bundle(args.bundle, load_private_key(args.key))
    print(f"signed {manifest.name} {manifest.version} in {args.bundle}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    from linesight.artifacts import BundleError, load_public_key, verify_bundle

    key = load_public_key(args.key) if args.key else None
    failed = 0
    for bundle in args.bundle:
        try:
            manifest = verify_bundle(bundle, key)
        except BundleError as exc:
            print(f"FAIL {bundle}: {exc}", file=sys.stderr)
            failed += 1
            continue
        signed = "signature ok" if key else "signature NOT checked (no --key)"
        print(f"ok   {bundle}: {manifest.name} {manifest.version}, digests ok, {signed}")
    return 1 if failed else 0


def _models_list(args: argparse.Namespace) -> int:
    from linesight.artifacts import BundleError, parse_manifest

    for bundle in _bundles_below(args.root):
        try:
            manifest = parse_manifest((bundle / "manifest.json").read_bytes())
        except BundleError as exc:
            print(f"{bundle}: unreadable manifest: {exc}", file=sys.stderr)
            continue
        metrics = manifest.metrics
        if args.json:
            print(json.dumps({"path": str(bundle), **manifest.model_dump(mode="json")}))
        elif metrics:
            print(
                f"{manifest.name:<24} {manifest.version:<8} {manifest.input.layout} "
                f"{manifest.input.colour:<4} {manifest.input.dtype:<7} acc {metrics.accuracy:.3f} "
                f"recall {metrics.defect_recall:.3f}  {bundle}"
            )
        else:
            print(f"{manifest.name:<24} {manifest.version:<8} (no metrics)  {bundle}")
    return 0


def _bundles_below(root: Path) -> list[Path]:
    from linesight.artifacts import find_bundles

    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    return find_bundles(root)


def _models_evaluate(args: argparse.Namespace) -> int:
    from edge_agent.evaluate import evaluate_bundle
    from linesight.artifacts import load_public_key, verify_bundle

    manifest = verify_bundle(args.bundle, load_public_key(args.key) if args.key else None)
    recorded = manifest.metrics
    seed = args.seed if args.seed is not None else (recorded.seed if recorded else 1000)
    size = args.size if args.size is not None else (recorded.size if recorded else 1000)
    rate = args.defect_rate
    if rate is None:
        rate = recorded.defect_rate if recorded else 0.3
    if size <= 0:
        raise UsageError("--size must be > 0")
    measured = evaluate_bundle(args.bundle, manifest, seed=seed, size=size, defect_rate=rate)
    print(json.dumps(measured.model_dump(mode="json"), sort_keys=True))
    return 0


def _add_agent(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = sub.add_parser(
        "agent",
        help="run a station: inspect parts, decide, publish over MQTT",
        description="Run one inspection station. Settings come from --config (YAML) and any "
        "flag below overrides the file's key of the same name.",
    )
    agent.add_argument("--config", type=path_flag, help="station YAML file")
    agent.add_argument("--station", help="station id: 1 to 64 letters, digits, _ . -, "
                       "starting with a letter or digit")
    agent.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    agent.add_argument("--source", help="camera:0 | rtsp(s)://… | http(s)://… | video:PATH | "
                       "folder:PATH | synthetic:seed=7,rate=10")
    agent.add_argument("--active", type=path_flag, help="bundle folder of the ACTIVE model")
    agent.add_argument("--candidate", type=path_flag, help="bundle folder of the CANDIDATE model")
    agent.add_argument("--mode", choices=["none", "shadow", "canary", "blue_green"])
    agent.add_argument("--canary-fraction", type=float)
    agent.add_argument(
        "--automation", choices=["human_only", "shadow", "assist", "partial", "full"]
    )
    agent.add_argument("--audit-fraction", type=float)
    agent.add_argument("--data-dir", type=path_flag, help="local store, outbox and review images")
    agent.add_argument("--max-parts", type=int,
                       help="inspect N parts, deliver what is owed, then exit 0")
    agent.add_argument("--receipt-wait", type=float,
                       help="with --max-parts: seconds to wait for receipts before exiting")
    agent.add_argument("--metrics-port", type=int, help="Prometheus metrics port")
    agent.add_argument("--key", type=path_flag, help="public key bundles must be signed with")
    agent.add_argument("--command-key", type=path_flag,
                       help="the controller's public command key: refuse unsigned commands")
    agent.add_argument("--topic-prefix", help="MQTT topic root (default linesight/v1)")
    _add_set_flag(agent, "station", "--set inference.timeout_ms=500 --set outbox.relay=thread")
    agent.set_defaults(handler=_run_agent)


def _add_set_flag(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
        help=f"any other key of the {what} YAML, dotted, with a YAML value (KEY=null sets it "
        f"to null); repeatable, e.g. {example} (the named flags above win)",
    )


def _overrides(settings: Sequence[str], named: dict[str, Any]) -> dict[str, Any]:
    """`--set` values (`KEY=null` included: it sets the key to null), then the named flags that
    were given on top; a named flag left out (None) overrides nothing."""
    return {
        **parse_settings(settings),
        **{key: value for key, value in named.items() if value is not None},
    }


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` flags as dotted overrides; each value is read as YAML (a number, a
    word, a list like [a, b] or a mapping like {type: log})."""
    import yaml

    from linesight.config_file import load_yaml, yaml_problem

    parsed: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {setting!r}: expected KEY=VALUE with a dotted key, "
                             "e.g. inference.timeout_ms=500")
        try:
            parsed[key] = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as exc:  # said without the value: it may be a password
            raise UsageError(f"--set {key}: the value is not valid YAML: "
                             f"{yaml_problem(exc)}") from exc
    return parsed


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The station configuration `linesight agent` was given: --config, then --set, then the
    named flags."""
    from edge_agent.config import load_config

    named = {
        "station": args.station,
        "broker.url": args.broker,
        "source": args.source,
        "active": args.active,
        "candidate": args.candidate,
        "mode": args.mode,
        "canary_fraction": args.canary_fraction,
        "automation": args.automation,
        "audit_fraction": args.audit_fraction,
        "data_dir": args.data_dir,
        "max_parts": args.max_parts,
        "outbox.receipt_wait_s": args.receipt_wait,
        "metrics_port": args.metrics_port,
        "key": args.key,
        "command_key": args.command_key,
        "topic_prefix": args.topic_prefix,
    }
    return load_config(args.config, _overrides(args.settings, named))


def _run_agent(args: argparse.Namespace) -> int:
    import signal

    from edge_agent.agent import Agent
    from edge_agent.store import DB_FILE
    from linesight.config_file import make_data_dir

    config = agent_config(args)
    make_data_dir(config.data_dir)
    try:
        agent = Agent(config)
    except sqlite3.Error as exc:  # the station's store damaged, or locked past the busy timeout
        raise UsageError(f"{config.data_dir / DB_FILE}: {exc}") from exc

    def stop(signum: int, _frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return agent.run()


def _add_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import os

    fleet = sub.add_parser(
        "fleet", help="the fleet controller: serve it, or drive its rollouts",
        description="The fleet controller rolls a model out station by station on evidence.",
    )
    verbs = fleet.add_subparsers(dest="verb", metavar="VERB", required=True)
    serve = verbs.add_parser("serve", help="run the controller (MQTT ingest, rollouts, HTTP)")
    serve.add_argument("--config", type=path_flag, help="controller YAML file")
    serve.add_argument("--broker", help="mqtt://host:port")
    serve.add_argument("--data-dir", type=path_flag, help="fleet store and rollout state")
    serve.add_argument("--http-host", help="address of the API, dashboard and bundle server")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--bundles", type=path_flag, help="folder of model bundles to serve")
    serve.add_argument("--key", type=path_flag, help="public key bundles must be signed with")
    serve.add_argument("--command-key", type=path_flag,
                       help="private key to sign every command with (stations verify it)")
    serve.add_argument("--public-url", help="URL stations use to reach this controller")
    serve.add_argument("--topic-prefix")
    _add_set_flag(serve, "controller", "--set offline_after_s=60")
    serve.set_defaults(handler=_fleet_serve)

    backup = verbs.add_parser(
        "backup", help="copy the controller's fleet store (fleet.db) while it runs",
        description="A consistent copy of data_dir/fleet.db, taken while the controller runs "
        "(it goes on storing meanwhile), checked and synced before it gets its name. To "
        "restore: stop the controller, put the copy in place of data_dir/fleet.db, delete "
        "fleet.db-wal and fleet.db-shm beside it, start the controller.",
    )
    backup.add_argument("dest", type=path_flag, help="a new file, or a folder: there the copy is "
                        "named fleet-YYYYmmdd-HHMMSS.db")
    source = backup.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=path_flag,
                        help="the controller's YAML file (its data_dir)")
    source.add_argument("--data-dir", type=path_flag, help="the controller's data_dir")
    backup.add_argument("--keep", type=int, metavar="N",
                        help="with a folder: keep only the newest N backups in it")
    backup.set_defaults(handler=_fleet_backup)

    def client_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--controller", default=os.environ.get("LINESIGHT_CONTROLLER", "http://127.0.0.1:8700"),
            help="controller URL (default $LINESIGHT_CONTROLLER or http://127.0.0.1:8700)",
        )
        parser.add_argument("--token", default=os.environ.get("LINESIGHT_API_TOKEN"),
                            help="API token (default $LINESIGHT_API_TOKEN)")

    stations = verbs.add_parser("stations", help="list the stations the controller knows")
    client_options(stations)
    stations.set_defaults(handler=_fleet_stations)

    realign = verbs.add_parser(
        "realign", help="put stations back on the model their last promoted rollout gave them",
        description="Start a rollout that deploys and promotes, on these stations alone and "
        "without gates, the model that their latest promoted rollout made their active model: "
        "for stations that came back from a backup, or were replaced, running another one "
        "('linesight fleet stations' marks them OUT OF STEP).", epilog=EXIT_STATUS_TEXT,
    )
    realign.add_argument("stations", nargs="*", metavar="STATION", help="station ids")
    realign.add_argument("--all", action="store_true",
                         help="every station the controller shows out of step")
    realign.add_argument("--by", default=os.environ.get("USER", "cli"))
    client_options(realign)
    realign.set_defaults(handler=_fleet_realign)

    rollout = verbs.add_parser("rollout", help="start, watch and steer rollouts",
                               epilog=EXIT_STATUS_TEXT)
    steps = rollout.add_subparsers(dest="step", metavar="STEP", required=True)
    begin = steps.add_parser("start", help="start a rollout of a bundle with a plan",
                             epilog=EXIT_STATUS_TEXT)
    begin.add_argument("plan", type=path_flag, help="plan YAML (see deploy/plans/)")
    begin.add_argument("--candidate", required=True, help="NAME:VERSION of a served bundle")
    begin.add_argument("--by", default=os.environ.get("USER", "cli"),
                       help="who starts it, for the rollout's history (default $USER)")
    begin.add_argument(
        "--after", metavar="ROLLOUT_ID",
        help="the id of the latest rollout, as 'status' shows it ('none' when none has run): "
        "refused unless that is still the latest, so a command run again cannot start a "
        "second rollout")
    client_options(begin)
    begin.set_defaults(handler=_rollout_start)
    status = steps.add_parser("status", help="show the current rollout")
    status.add_argument("--watch", action="store_true", help="refresh every 2 s until it ends")
    status.add_argument("--json", action="store_true",
                        help="the rollout as the API gives it, one JSON document a line "
                        "(null when no rollout has run)")
    client_options(status)
    status.set_defaults(handler=_rollout_status)
    for action, text in (("approve", "approve the stage waiting for a human"),
                         ("pause", "pause the rollout"), ("resume", "resume a paused rollout"),
                         ("abort", "abort a rollout that has not ended: roll back every "
                          "touched station"),
                         ("rollback", "roll back every touched station (also after promotion)")):
        step = steps.add_parser(action, help=text, epilog=EXIT_STATUS_TEXT)
        step.add_argument("--id", default="current", help="rollout id (default: the current)")
        if action == "approve":
            step.add_argument(
                "--stage", type=int, metavar="N",
                help="the number of the stage to approve, as 'status' shows it: refused unless "
                "that stage is the one waiting, so a repeated command cannot approve the next "
                "(default: the stage waiting when the command reads the rollout)")
        step.add_argument("--reason", default="")
        step.add_argument("--by", default=os.environ.get("USER", "cli"))
        client_options(step)
        step.set_defaults(handler=_rollout_act, action=action)


def _client(args: argparse.Namespace) -> ControllerClient:
    from deploy.client import ControllerClient

    return ControllerClient(args.controller, args.token)


def _fleet_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from deploy.api import create_app
    from deploy.config import load_controller_config
    from deploy.controller import Controller
    from linesight.config_file import make_data_dir, make_folder
    from linesight.http_server import HttpServer

    config = load_controller_config(args.config, _overrides(args.settings, {
        "broker.url": args.broker, "data_dir": args.data_dir, "http_host": args.http_host,
        "http_port": args.http_port, "bundles": args.bundles, "key": args.key,
        "command_key": args.command_key,
        "public_url": args.public_url, "topic_prefix": args.topic_prefix,
    }))
    make_data_dir(config.data_dir)
    # Missing on a first start (the example puts it under data_dir): made, empty. It need not
    # be writable (a read-only mount of the site's bundles).
    make_folder(config.bundles, "bundles")
    try:
        controller = Controller(config)
    except sqlite3.Error as exc:  # the fleet store damaged, or locked past the busy timeout
        raise UsageError(f"{config.data_dir / 'fleet.db'}: {exc}") from exc
    try:
        server = HttpServer(create_app(controller), config.http_host, config.http_port)
    except OSError as exc:
        controller.store.close()
        raise UsageError(f"cannot serve the API on {config.http_host}:{config.http_port}: "
                         f"{exc.strerror or exc}") from exc
    controller.http_port = server.port
    stopped = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    controller.start()
    server.start()
    print(f"fleet controller: dashboard and API on {server.url}, broker {config.broker.url}",
          flush=True)
    stopped.wait()
    server.stop()
    controller.stop()
    return 0


def _fleet_backup(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from deploy.backup import BackupError, back_up
    from deploy.config import load_controller_config

    data_dir = args.data_dir or load_controller_config(args.config, {}).data_dir
    try:
        done = back_up(data_dir, args.dest, datetime.now(UTC), args.keep)
    except BackupError as exc:
        raise UsageError(str(exc)) from exc
    print(f"backed up {data_dir / 'fleet.db'} to {done.path} ({done.size_bytes / 1e6:.1f} MB, "
          f"schema {done.schema_version}, {done.seconds:.1f} s)")
    for old in done.removed:
        print(f"removed the older backup {old}")
    return 0


def _fleet_stations(args: argparse.Namespace) -> int:
    for station in _client(args).stations():
        state = station["state"] or {}
        active = (state.get("active") or {}).get("version", "-")
        candidate = (state.get("candidate") or {}).get("version", "-")
        print(f"{station['station']:<16} {'online ' if station['online'] else 'OFFLINE'} "
              f"active {active:<8} candidate {candidate:<8} mode {state.get('mode', '-'):<10} "
              f"automation {state.get('automation', '-'):<10} "
              f"{_parts_missed_note(station)}{_out_of_step_note(station)}")
    return 0


def _parts_missed_note(station: dict[str, Any]) -> str:
    """'missed/h 0', 'missed/h -' (not reported) or 'missed/h 7  MISSED 7 PARTS ...'."""
    figure = station.get("parts_missed_last_hour")
    parts = figure.get("parts") if isinstance(figure, dict) else None
    if not isinstance(parts, int):
        return "missed/h - "
    note = f"  MISSED {parts} PARTS in the last hour" if parts > 0 else ""
    return f"missed/h {parts} {note}"


def _out_of_step_note(station: dict[str, Any]) -> str:
    """'  OUT OF STEP: ...' for a station running another model than its promoted one."""
    expected = station.get("expected_active")
    if not station.get("out_of_step") or not isinstance(expected, dict):
        return ""
    return (f"  OUT OF STEP: promoted {expected.get('name')} {expected.get('version')} "
            f"(linesight fleet realign {station['station']})")


def _fleet_realign(args: argparse.Namespace) -> int:
    import re

    from deploy.client import format_rollout
    from linesight.protocol import STATION_ID_PATTERN

    if bool(args.stations) == args.all:
        raise UsageError("name the stations to realign, or give --all")
    for station in args.stations:
        if not re.fullmatch(STATION_ID_PATTERN, station):
            raise UsageError(f"{station!r} is not a station id: 1 to 64 letters, digits, '.', "
                             "'_' or '-', starting with a letter or digit")
    client = _client(args)
    stations = list(args.stations)
    if args.all:
        behind = [s for s in client.stations() if s.get("out_of_step")]
        if not behind:
            print("no station is out of step")
            return 0
        # An offline station cannot take the model now: the others are not held back by it.
        offline = [s["station"] for s in behind if not s.get("online")]
        stations = [s["station"] for s in behind if s.get("online")]
        if offline:
            print(f"offline, realign once back: {' '.join(offline)}", file=sys.stderr)
        if not stations:
            raise UsageError("every station out of step is offline: realign them once they "
                             "are back")
    print(format_rollout(client.realign(stations, by=args.by)))
    return 0


def _rollout_start(args: argparse.Namespace) -> int:
    name, sep, version = args.candidate.partition(":")
    if not sep or not name or not version:
        raise UsageError("--candidate must be NAME:VERSION, e.g. part-classifier:2.0.0")
    try:
        plan_text = args.plan.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read plan {args.plan}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"plan {args.plan} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason})") from exc
    from deploy.client import UNCHECKED, format_rollout

    after = UNCHECKED if args.after is None else None if args.after == "none" else args.after
    print(format_rollout(_client(args).start_rollout(plan_text, name, version, by=args.by,
                                                     after=after)))
    return 0


def _rollout_status(args: argparse.Namespace) -> int:
    import time

    from deploy.client import ControllerUnavailable, NotAController, format_rollout

    client = _client(args)
    shown = away = False
    while True:
        try:
            doc = client.current()
        except NotAController:
            raise
        except ControllerUnavailable as exc:
            if not shown:  # a wrong address, or no controller: say so at once
                raise
            # Watching, and the controller restarts: the rollout goes on, so keep watching.
            if not away:
                print(f"linesight fleet: {exc}; still watching", file=sys.stderr, flush=True)
            away = True
            time.sleep(2)
            continue
        away = False
        if doc is None:
            print("null" if args.json else "no rollout has run on this controller")
            return 0
        print(json.dumps(doc) if args.json else format_rollout(doc), flush=True)
        shown = True
        if not args.watch or doc["phase"] in ("promoted", "rolled_back", "aborted"):
            return 0
        time.sleep(2)
        if not args.json:  # with --json one document a line (JSON Lines)
            print()


def _rollout_act(args: argparse.Namespace) -> int:
    from deploy.client import format_rollout

    client = _client(args)
    stage: int | None = getattr(args, "stage", None)
    if stage is not None and stage < 1:
        raise UsageError("--stage: the stage's number as 'linesight fleet rollout status' "
                         "shows it, from 1")
    index = None if stage is None else stage - 1
    if args.action == "approve" and index is None:
        # The stage seen waiting, named to the controller: should another stage wait by the
        # time the request lands, the controller refuses it instead of approving that one.
        index = _waiting_stage(client.rollout(args.id), args.id)
    doc = client.act(args.action, args.id, by=args.by, reason=args.reason, stage=index)
    if args.action == "approve" and index is not None:
        print(f"approved stage {_stage_text(doc, index)}")
    print(format_rollout(doc))
    return 0


def _stage_text(doc: dict[str, Any], index: int) -> str:
    """A stage as `status` shows it: its number from 1 and its name."""
    stages = doc.get("stages")
    names = [s.get("name") for s in stages if isinstance(s, dict)] if isinstance(stages, list) \
        else []
    name = names[index] if 0 <= index < len(names) else None
    return f"{index + 1} {name!r}" if name is not None else str(index + 1)


def _waiting_stage(doc: dict[str, Any] | None, rollout_id: str) -> int:
    """The index of the stage `doc`'s rollout waits to have approved; UsageError if none."""
    if doc is None:
        raise UsageError("nothing to approve: no rollout has run on this controller")
    stage = doc.get("stage")
    if doc.get("phase") != "waiting_approval" or not isinstance(stage, int):
        which = "the current rollout" if rollout_id == "current" else "rollout"
        raise UsageError(
            f"nothing to approve: {which} {doc['rollout_id']} is {doc.get('phase')} at stage "
            f"{_stage_text(doc, stage) if isinstance(stage, int) else '?'}"
        )
    return stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linesight",
        description="Line-side visual inspection with safe, evidence-gated model rollout.",
    )
    parser.add_argument("--version", action="version", version=f"linesight {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_models(sub)
    _add_agent(sub)
    _add_fleet(sub)
    register_station_ui(sub)
    add_sim_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.client import ControllerError, ControllerUnavailable, OutcomeUnknown
    from linesight.artifacts import BundleError
    from linesight.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.command, args.log_level)
        handler: Handler = args.handler
        return handler(args)
    except OutcomeUnknown as exc:
        print(f"linesight {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_MAYBE_DONE
    except (UsageError, BundleError, ValueError, OSError, ControllerError,
            ControllerUnavailable) as exc:
        print(f"linesight {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_DONE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
