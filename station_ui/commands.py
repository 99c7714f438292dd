"""`linesight ui` (serve the station screen) and `linesight ui-operator add|reset`."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import sqlite3
import stat
import sys
from pathlib import Path
from typing import TextIO

from linesight.config_file import make_data_dir, path_flag
from linesight.protocol import AutomationLevel

log = logging.getLogger(__name__)
SECRET_FILE = "ui-secret.key"  # noqa: S105 - a file name, not a secret
_SECRET_BYTES = 32


class CommandError(Exception):
    """Printed to stderr without a traceback; the command exits with status 2."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "ui",
        help="serve the station's operator screen (review queue, status, supervisor)",
        description="Serve the station UI with waitress. It shares only the station store with "
        "the agent, so it can be restarted at any time without touching inspection.",
    )
    serve.add_argument("--data-dir", type=path_flag, required=True, help="the agent's data dir")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--idle-timeout", type=float, default=300.0, metavar="S",
        help="sign an operator out after this many seconds without activity (default 300)",
    )
    serve.add_argument(
        "--secret-file", type=path_flag,
        help=f"session signing key (default: <data-dir>/{SECRET_FILE}, created 0600)",
    )
    serve.add_argument(
        "--max-automation", choices=[level.value for level in AutomationLevel],
        default=AutomationLevel.FULL.value,
        help="highest automation level a supervisor may choose here (default full)",
    )
    serve.add_argument("--shift-hours", type=int, default=8, help="shift length (default 8)")
    serve.add_argument(
        "--shift-start", type=int, default=6, metavar="HOUR",
        help="local hour a shift starts; the others follow every --shift-hours (default 6)",
    )
    serve.add_argument(
        "--outbox-warn", type=int, default=500, metavar="N",
        help="warn operators when more than N messages wait to be sent (default 500)",
    )
    serve.add_argument(
        "--secure-cookie", action="store_true",
        help="mark the session cookie Secure (only when served over HTTPS)",
    )
    serve.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    serve.set_defaults(handler=_serve)

    operators = sub.add_parser(
        "ui-operator",
        help="create operators and reset their PIN (supervisor command)",
        description="The PIN is read from stdin when it is not a terminal, else prompted "
        "twice; it is never taken from a flag.",
    )
    verbs = operators.add_subparsers(dest="verb", metavar="VERB", required=True)
    add = verbs.add_parser("add", help="create an operator")
    add.add_argument("--data-dir", type=path_flag, required=True)
    add.add_argument("--badge", required=True, help="badge id the operator signs in with")
    add.add_argument("--name", required=True, help="name shown on screen")
    add.add_argument("--role", choices=["operator", "supervisor"], default="operator")
    add.set_defaults(handler=_operator_add)
    reset = verbs.add_parser("reset", help="set a new PIN (and optionally name or role)")
    reset.add_argument("--data-dir", type=path_flag, required=True)
    reset.add_argument("--badge", required=True)
    reset.add_argument("--name", help="new name (default: unchanged)")
    reset.add_argument("--role", choices=["operator", "supervisor"], help="new role")
    reset.set_defaults(handler=_operator_reset)


# UiConfig's fields that `linesight ui` sets from a flag of another name.
_FLAG_OF = {
    "idle_timeout_s": "--idle-timeout", "shift_hours": "--shift-hours",
    "shift_anchor_hour": "--shift-start", "outbox_warn": "--outbox-warn",
}


def _fail(command: str, message: str) -> int:
    print(f"linesight {command}: error: {message}", file=sys.stderr)
    return 2


def load_secret(path: Path) -> bytes:
    """The session key in `path`, created (0600, never replaced) on first use."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = -1
    if fd < 0:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise CommandError(f"{path}: the secret key is too short (at least 16 bytes)")
        return key
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(_SECRET_BYTES).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # A full disk: an empty key file left behind would fail every later start.
        path.unlink(missing_ok=True)
        raise
    return path.read_bytes().strip()


def _serve(args: argparse.Namespace) -> int:
    try:
        return _serve_checked(args)
    except (CommandError, ValueError, OSError) as exc:
        return _fail("ui", str(exc))


def _serve_checked(args: argparse.Namespace) -> int:
    from edge_agent.store import DB_FILE, StationStore, StoreError
    from linesight.http_server import serve
    from station_ui.app import create_app
    from station_ui.config import UiConfig

    if not 0 < args.port < 65536:
        raise CommandError(f"--port {args.port}: must be 1 to 65535")
    if args.threads < 1:
        raise CommandError("--threads: at least 1")
    make_data_dir(args.data_dir, "--data-dir")
    secret = load_secret(args.secret_file or args.data_dir / SECRET_FILE)
    try:
        config = UiConfig(
            data_dir=args.data_dir,
            secret_key=secret,
            idle_timeout_s=args.idle_timeout,
            max_automation=AutomationLevel(args.max_automation),
            shift_hours=args.shift_hours,
            shift_anchor_hour=args.shift_start,
            outbox_warn=args.outbox_warn,
            secure_cookie=args.secure_cookie,
        )
    except ValueError as exc:  # named by its field: say which flag the user typed instead
        field, _, reason = str(exc).partition(": ")
        raise CommandError(f"{_FLAG_OF.get(field, field)}: {reason}") from exc
    try:
        store = StationStore(args.data_dir)
    except StoreError as exc:
        raise CommandError(str(exc)) from exc
    except sqlite3.Error as exc:  # damaged, or locked past the busy timeout
        raise CommandError(f"{args.data_dir / DB_FILE}: {exc}") from exc
    try:
        app = create_app(config, store)
        log.info("station UI on http://%s:%d/ for %s", args.host, args.port, args.data_dir)
        serve(app, args.host, args.port, threads=args.threads, ident="")
    finally:
        store.close()
    return 0


def read_pin(stdin: TextIO | None = None) -> str:
    """A PIN from stdin when piped (one line), else prompted twice on the terminal."""
    from station_ui.security import check_pin

    stream = stdin or sys.stdin
    if stream.isatty():
        pin = getpass.getpass("PIN (4 to 12 digits): ")
        if getpass.getpass("PIN again: ") != pin:
            raise CommandError("the two PINs differ")
    else:
        pin = stream.readline().rstrip("\r\n")
    try:
        check_pin(pin)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return pin


def _operator_add(args: argparse.Namespace) -> int:
    return _save_operator(args, create=True)


def _operator_reset(args: argparse.Namespace) -> int:
    return _save_operator(args, create=False)


def _save_operator(args: argparse.Namespace, *, create: bool) -> int:
    from edge_agent.store import DB_FILE, StationStore, StoreError
    from station_ui.security import check_badge, hash_pin

    try:
        check_badge(args.badge)
        if not args.data_dir.is_dir():
            raise CommandError(f"{args.data_dir}: no such data dir")
        with StationStore(args.data_dir) as store:
            existing = store.operator(args.badge)
            if create and existing is not None:
                raise CommandError(f"badge {args.badge} exists; use 'ui-operator reset'")
            if not create and existing is None:
                raise CommandError(f"no operator with badge {args.badge}; use 'ui-operator add'")
            name = args.name or (existing.name if existing else "")
            role = args.role or (existing.role if existing else "operator")
            if not name.strip() or len(name) > 64:
                raise CommandError("--name: 1 to 64 characters")
            store.upsert_operator(args.badge, name.strip(), role, hash_pin(read_pin()))
    except (CommandError, StoreError, ValueError, OSError) as exc:
        return _fail(f"ui-operator {args.verb}", str(exc))
    except sqlite3.Error as exc:  # damaged, or locked past the busy timeout
        return _fail(f"ui-operator {args.verb}", f"{args.data_dir / DB_FILE}: {exc}")
    verb = "created" if create else "updated; their open sessions end"
    print(f"operator {args.badge} ({role}) {verb}")
    return 0
