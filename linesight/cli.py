"""The `linesight` command: the front door to every process of the appliance."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from linesight import __version__

Handler = Callable[[argparse.Namespace], int]


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
    keygen.add_argument("--private", type=Path, required=True, help="private key file to create")
    keygen.add_argument("--public", type=Path, required=True, help="public key file to create")
    keygen.set_defaults(handler=_models_keygen)

    sign = verbs.add_parser(
        "sign", help="refresh the digests of a bundle's files and sign its manifest"
    )
    sign.add_argument("bundle", type=Path, help="bundle folder")
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    sign.set_defaults(handler=_models_sign)

    verify = verbs.add_parser(
        "verify", help="check a bundle's schema, digests, sizes, external data and signature"
    )
    verify.add_argument("bundle", type=Path, nargs="+", help="bundle folder(s)")
    verify.add_argument(
        "--key", type=Path, help="Ed25519 public key (PEM); without it the signature is not checked"
    )
    verify.set_defaults(handler=_models_verify)

    listing = verbs.add_parser("list", help="list the bundles below a folder")
    listing.add_argument("root", type=Path, nargs="?", default=Path("models"))
    listing.add_argument("--json", action="store_true", help="one JSON object per bundle")
    listing.set_defaults(handler=_models_list)

    evaluate = verbs.add_parser(
        "evaluate", help="measure accuracy, defect recall and false rejects on held-out parts"
    )
    evaluate.add_argument("bundle", type=Path)
    evaluate.add_argument("--seed", type=int, help="held-out seed (default: the manifest's)")
    evaluate.add_argument("--size", type=int, help="number of parts (default: the manifest's)")
    evaluate.add_argument("--defect-rate", type=float, default=None)
    evaluate.add_argument("--key", type=Path, help="verify the signature with this public key")
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
    agent.add_argument("--config", type=Path, help="station YAML file")
    agent.add_argument("--station", help="station id (letters, digits, _ . -)")
    agent.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    agent.add_argument("--source", help="camera:0 | rtsp://… | http://… | video:PATH | "
                       "folder:PATH | synthetic:seed=7,rate=10")
    agent.add_argument("--active", type=Path, help="bundle folder of the ACTIVE model")
    agent.add_argument("--candidate", type=Path, help="bundle folder of the CANDIDATE model")
    agent.add_argument("--mode", choices=["none", "shadow", "canary", "blue_green"])
    agent.add_argument("--canary-fraction", type=float)
    agent.add_argument(
        "--automation", choices=["human_only", "shadow", "assist", "partial", "full"]
    )
    agent.add_argument("--audit-fraction", type=float)
    agent.add_argument("--data-dir", type=Path, help="local store, outbox and review images")
    agent.add_argument("--max-parts", type=int,
                       help="inspect N parts, deliver what is owed, then exit 0")
    agent.add_argument("--receipt-wait", type=float,
                       help="with --max-parts: seconds to wait for receipts before exiting")
    agent.add_argument("--metrics-port", type=int, help="Prometheus metrics port")
    agent.add_argument("--key", type=Path, help="public key bundles must be signed with")
    agent.add_argument("--topic-prefix", help="MQTT topic root (default linesight/v1)")
    agent.set_defaults(handler=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    import signal

    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    overrides = {
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
        "topic_prefix": args.topic_prefix,
    }
    config = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    agent = Agent(config)

    def stop(signum: int, _frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return agent.run()


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from linesight.artifacts import BundleError
    from linesight.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.command, args.log_level)
        handler: Handler = args.handler
        return handler(args)
    except (UsageError, BundleError, ValueError, OSError) as exc:
        print(f"linesight {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
