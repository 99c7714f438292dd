"""The controller's HTTP side: the JSON API the CLI and the dashboard use, the bundle server
stations download candidates from, and Prometheus metrics."""

from __future__ import annotations

import hmac
import re
import time
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request, send_file
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from deploy.config import is_loopback
from deploy.controller import (
    ANY_LATEST,
    EVIDENCE_REUSE_S,
    CandidateError,
    Controller,
    RolloutConflict,
    RolloutNotSaved,
    UnknownStation,
    bundle_file,
)
from deploy.parts_missed import PartsMissed, RecentPartsMissed
from deploy.plan import PlanError, RolloutPlan, parse_plan
from deploy.rollout import (
    Abort,
    Approve,
    Event,
    Pause,
    Resume,
    RollbackRequested,
    RolloutState,
    TransitionError,
    judge,
    to_status,
)
from linesight import json_keys
from linesight import protocol as p
from linesight.config_file import load_yaml
from linesight.disk_space import MB

api = Blueprint("api", __name__, url_prefix="/api")
bundles = Blueprint("bundles", __name__, url_prefix="/bundles")

MAX_REQUEST_BYTES = 1024 * 1024
"""A larger request body is refused (413) before it is read."""
MAX_PLAN_YAML_CHARS = 64 * 1024
"""A plan is a few hundred bytes; PyYAML takes quadratic time over some longer texts."""


def controller() -> Controller:
    found: Controller = current_app.extensions["linesight.controller"]
    return found


def _host_name(header: str) -> str:
    """The name or address in a Host header, without its port ("[::1]:8700" -> "::1")."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if ":" in header else header


def _require_token() -> None:
    token = controller().config.api_token
    if token is None:
        # Only a controller on 127.0.0.1 runs without a token. A web page whose name resolves
        # to 127.0.0.1 (DNS rebinding) would still reach it from a browser on this machine: it
        # cannot send a Host that names this machine.
        if not is_loopback(_host_name(request.host)):
            abort(403, description=f"requests for host {request.host!r} are refused: without "
                  "an api_token this controller takes them only addressed to 127.0.0.1 or "
                  "localhost")
        return
    given = _bearer_token(request.headers.get("Authorization", ""))
    if not given:
        abort(401, description="no API token was given: send this controller's api_token as "
              "Authorization: Bearer <token>")
    if not hmac.compare_digest(given.encode(), token.encode()):
        abort(401, description="the API token given is not this controller's api_token")


def _bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer <token>` header ("" without one); the scheme's
    case does not matter (RFC 9110, 11.1)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _body(*known: str) -> dict[str, Any]:
    """The request's JSON object, with no keys but the `known` ones; {} for an empty body. A
    POST must say `Content-Type: application/json`: a browser sends that to another site only
    after a CORS preflight, which this API never allows, so no web page can make an operator's
    browser act on a rollout."""
    if not request.is_json:
        abort(415, description="send the body as JSON, with Content-Type: application/json")
    try:
        data = request.get_data()
    except RequestEntityTooLarge:
        abort(413, description=f"the request body is larger than {MAX_REQUEST_BYTES} bytes")
    if not data.strip():
        return {}
    try:
        document = json_keys.loads(data)
    except RecursionError:
        abort(400, description="the request body is nested too deeply")
    except ValueError as exc:  # not JSON, not UTF-8, an integer of more than 4300 digits ...
        abort(400, description=f"the request body is not valid JSON: {exc}")
    if not isinstance(document, dict):
        abort(400, description="the request body must be a JSON object")
    _refuse_unknown_keys(document, known, "")
    return document


def _refuse_unknown_keys(document: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """A 400 naming keys this request does not take: a misspelt guard (`afetr`) ignored would
    let the request through unguarded."""
    unknown = sorted(str(key) for key in document if key not in known)
    if unknown:
        names = ", ".join(repr(key[:40]) for key in unknown[:5])
        abort(400, description=f"{where}unknown key{'s' if len(unknown) > 1 else ''} {names}; "
              f"this request takes {', '.join(known)}")


_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})
"""Unicode categories refused in free text: control characters, line and paragraph separators."""


def _text(body: dict[str, Any], key: str, max_length: int) -> str:
    """body[key], a string cut to max_length; "" when absent or null."""
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        abort(400, description=f"{key}: a string is expected")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): it cannot be stored
        abort(400, description=f"{key}: not valid Unicode text")
    # Who acted and why go into the rollout's history and the log: a line break or a terminal
    # escape there could forge an entry. A tab is harmless.
    control = next((c for c in value if c != "\t" and unicodedata.category(c) in _LINE_BREAKING),
                   None)
    if control is not None:
        abort(400, description=f"{key}: control characters (such as a line break) are not "
              f"allowed; found U+{ord(control):04X}")
    return value[:max_length]


@api.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[Response, int]:
    return jsonify(error=exc.description), exc.code or 500


@api.errorhandler(RolloutNotSaved)
def _not_saved(exc: RolloutNotSaved) -> tuple[Response, int]:
    """The store refused the write (locked past its busy timeout, the disk full): nothing
    changed, and the same request may be sent again."""
    return jsonify(error=f"{exc}; try again"), 503


@api.get("/health")
def health() -> Response:
    """Always 200 while the controller answers: a lost broker or a low disk is reported in the
    body (a warning to act on), not as an outage. `broker_error` says why the broker is out of
    reach when the link knows: credentials refused, a TLS handshake failed (with what to fix),
    another client with the controller's client id, or messages its ACL refuses.
    `broker_cert_warning` says which TLS certificate expires within `broker.cert_warn_days`,
    and when."""
    c = controller()
    disk = c.disk
    link = c.link
    return jsonify(
        broker_connected=link.connected,
        broker_error=(link.fatal_error or link.tls_error or link.conflict_error
                      or link.denied_error),
        broker_cert_warning=link.cert_warning,
        ingest=vars(c.counters),
        rollout=c.rollout.rollout_id if c.rollout else None,
        disk={
            "free_bytes": disk.free_bytes, "total_bytes": disk.total_bytes,
            "min_free_bytes": c.config.min_free_mb * MB, "low": disk.low, "error": disk.error,
        },
    )


def _parts_missed_json(figure: PartsMissed | None) -> dict[str, Any] | None:
    if figure is None:
        return None
    last = figure.last_missed
    return {"parts": figure.parts, "last_missed": last.isoformat() if last else None}


def _station_json(record: Any, online: bool, clock_behind_s: float | None,
                  parts_missed: PartsMissed | None) -> dict[str, Any]:
    state = record.state
    metrics = record.latest_metrics
    expected, out_of_step = controller().alignment(record)
    return {
        "station": record.station,
        "online": online,
        "last_seen": record.last_seen.isoformat() if record.last_seen else None,
        # How far its clock is behind the controller's (negative: ahead), from the arrival of
        # its last minute or two of messages; None when none arrived.
        "clock_behind_s": None if clock_behind_s is None else round(clock_behind_s, 1),
        # The model its latest promoted rollout made active (None: none did), and whether its
        # latest state names another active model (deploy/alignment.py).
        "expected_active": expected.model.model_dump(mode="json") if expected else None,
        "out_of_step": out_of_step,
        "labels": record.labels,
        # The parts it did not inspect in the last hour (missed PLC triggers, unreadable
        # images), by its metrics reports: {"parts", "last_missed"}; None when none of the
        # hour's reports says (a synthetic source, an older agent, no report).
        "parts_missed_last_hour": _parts_missed_json(parts_missed),
        "state": state.model_dump(mode="json", by_alias=True) if state else None,
        "metrics": metrics.model_dump(mode="json", by_alias=True) if metrics else None,
    }


@api.get("/stations")
def stations() -> Response:
    c = controller()
    now = datetime.now(UTC)
    # One read of the inventory: a station may join at any moment.
    clock = time.monotonic()
    records = c.store.stations()
    behind = {record.station: c.clock_offsets.behind_s(record.station, clock)
              for record in records}
    recent_missed: RecentPartsMissed = current_app.extensions["linesight.parts_missed"]
    missed = recent_missed(now, behind)
    return jsonify(stations=[
        _station_json(record, c.view(record, now).online, behind[record.station],
                      missed.get(record.station))
        for record in records
    ])


MAX_REALIGN_STATIONS = 1000


@api.post("/realign")
def realign() -> tuple[Response, int]:
    """Deploy and promote again, on the stations named, the model their latest promoted
    rollouts made active there (deploy/alignment.py). Body: {"stations": [...], "by": "..."}."""
    _require_token()
    body = _body("stations", "by")
    stations = body.get("stations")
    if not (isinstance(stations, list) and 0 < len(stations) <= MAX_REALIGN_STATIONS
            and all(isinstance(name, str) for name in stations)):
        abort(400, description="stations: give a list of 1 to "
              f"{MAX_REALIGN_STATIONS} station ids")
    for name in stations:
        if not re.fullmatch(p.STATION_ID_PATTERN, name):
            abort(400, description=f"stations: {name[:80]!r} is not a station id")
    by = _text(body, "by", 64) or "api"
    try:
        state = controller().realign(stations, by)
    except UnknownStation as exc:
        abort(404, description=str(exc))
    except RolloutConflict as exc:
        abort(409, description=str(exc))
    return jsonify(rollout_json(state)), 201


def rollout_json(state: RolloutState) -> dict[str, Any]:
    c = controller()
    status = to_status(state, 0).model_dump(mode="json", exclude={"schema_", "msg_id", "seq",
                                                                  "ts", "station"})
    evidence: dict[str, Any] | None = None
    record = state.record
    if record.observing_since is not None and record.stations:
        defect_label = c.defect_label(state)
        found = c.stage_evidence(state, max_age_s=EVIDENCE_REUSE_S)
        verdicts = judge(state.current, found)
        overall = found.overall
        evidence = {
            "since": record.observing_since.isoformat(),
            "defect_label": defect_label,
            "parts": overall.parts,
            "disagreements": overall.disagreements,
            "agreement_rate": 1 - overall.disagreements / overall.parts if overall.parts
            else None,
            "labelled_disagreements": overall.labelled_disagreements,
            "candidate_right": overall.candidate_right,
            "escape_disagreements_labelled": found.escapes.labelled_disagreements,
            "escape_candidate_right": found.escapes.candidate_right,
            "p95_latency_ms": found.p95_latency_ms,
            "error_diff_estimate": verdicts.overall.error_diff_estimate,
            "error_diff_upper": verdicts.overall.error_diff_upper,
            "escape_diff_estimate": verdicts.escapes.error_diff_estimate,
            "escape_diff_upper": verdicts.escapes.error_diff_upper,
            "gate": verdicts.overall.outcome.value,
            "escape_gate": verdicts.escapes.outcome.value,
            "min_parts": state.current.exit.min_parts,
            "min_labelled_disagreements": state.current.exit.min_labelled_disagreements,
        }
    return {
        **status,
        "phase_detail": state.phase.value,
        "started": state.started.isoformat(),
        "updated": state.updated.isoformat(),
        "pending_commands": [
            {"station": c_.station, "command": c_.body.get("name"), "attempts": c_.attempts}
            for c_ in state.pending
        ],
        "rollbacks_owed": [command.station for command in state.stranded],
        "history": state.history[-50:],
        "evidence": evidence,
        "deadline": record.deadline.isoformat() if record.deadline else None,
    }


@api.get("/rollouts")
def rollouts() -> Response:
    c = controller()
    return jsonify(rollouts=[
        {"rollout_id": rid, "phase": phase, "updated": updated.isoformat()}
        for rid, phase, updated in c.store.rollouts()
    ])


@api.get("/rollouts/current")
def current_rollout() -> Response:
    state = controller().rollout
    if state is None:
        abort(404, description="no rollout has run on this controller")
    return jsonify(rollout_json(state))


@api.get("/rollouts/<rollout_id>")
def one_rollout(rollout_id: str) -> Response:
    c = controller()
    if c.rollout and c.rollout.rollout_id == rollout_id:
        return jsonify(rollout_json(c.rollout))
    stored = c.store.rollout(rollout_id)
    if stored is None:
        abort(404, description=f"no rollout {rollout_id}")
    return jsonify(rollout_json(RolloutState.model_validate_json(stored)))


def _plan(text: str) -> RolloutPlan:
    """The plan in the request's plan_yaml; 400 naming what is wrong with it."""
    if len(text) > MAX_PLAN_YAML_CHARS:
        abort(400, description=f"plan_yaml: longer than {MAX_PLAN_YAML_CHARS} characters")
    try:
        document = load_yaml(text)
    except RecursionError:
        abort(400, description="plan_yaml: nested too deeply")
    except yaml.YAMLError as exc:
        abort(400, description=f"plan_yaml is not valid YAML: {exc}")
    except Exception as exc:  # noqa: BLE001 - PyYAML raises more than YAMLError for some values
        # an integer of more than 4300 digits, a date such as 2025-13-45, '!!timestamp x' ...
        abort(400, description=f"plan_yaml: a value cannot be read: {type(exc).__name__}: {exc}")
    try:
        return parse_plan(document, "plan_yaml")
    except PlanError as exc:
        abort(400, description=str(exc))


@api.post("/rollouts")
def start_rollout() -> tuple[Response, int]:
    _require_token()
    body = _body("plan_yaml", "candidate", "by", "after")
    candidate = body.get("candidate")
    if not (isinstance(candidate, dict) and isinstance(candidate.get("name"), str)
            and isinstance(candidate.get("version"), str)):
        abort(400, description="candidate: give {\"name\": \"...\", \"version\": \"...\"}")
    _refuse_unknown_keys(candidate, ("name", "version"), "candidate: ")
    plan_text = body.get("plan_yaml")
    if not isinstance(plan_text, str):
        abort(400, description="plan_yaml: the plan's YAML text is required")
    plan = _plan(plan_text)
    by = _text(body, "by", 64) or "api"
    after = _after(body) if "after" in body else ANY_LATEST
    try:
        state = controller().start_rollout(plan, candidate["name"], candidate["version"], by=by,
                                           after=after)
    except (CandidateError, PlanError) as exc:
        abort(400, description=str(exc))
    except RolloutConflict as exc:
        abort(409, description=str(exc))
    return jsonify(rollout_json(state)), 201


def _after(body: dict[str, Any]) -> str | None:
    """body["after"]: the id of the rollout a start is meant to follow, None (JSON null) for
    none having run."""
    value = body.get("after")
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= 200):
        abort(400, description="after: the id of the latest rollout, as the rollout's "
              "`rollout_id` gives it, or null when none has run")
    return value


def _stage(body: dict[str, Any]) -> int | None:
    """body["stage"]: the index of the stage an approval is meant for (as the rollout's
    `stage` gives it, 0 for the first); None when absent or null."""
    value = body.get("stage")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1000:
        abort(400, description="stage: the index of the stage to approve is expected, as the "
              "rollout's `stage` gives it (0 for the first)")
    return value


def _request_event(action: str, body: dict[str, Any]) -> Event:
    by = _text(body, "by", 64) or "api"
    reason = _text(body, "reason", 500)
    if action == "approve":
        return Approve(by=by, stage=_stage(body))
    if action == "pause":
        return Pause(by=by, reason=reason)
    if action == "resume":
        return Resume(by=by)
    if action == "abort":
        return Abort(by=by, reason=reason)
    return RollbackRequested(by=by, reason=reason)


_ACTIONS = ("approve", "pause", "resume", "abort", "rollback")


@api.post("/rollouts/<rollout_id>/<action>")
def act(rollout_id: str, action: str) -> Response:
    _require_token()
    if action not in _ACTIONS:
        abort(404, description=f"unknown action {action!r}; one of {', '.join(_ACTIONS)}")
    known = ("by", "reason", "stage") if action == "approve" else ("by", "reason")
    event = _request_event(action, _body(*known))
    c = controller()
    try:
        c.apply(event, rollout_id=None if rollout_id == "current" else rollout_id)
    except RolloutConflict as exc:
        current = c.rollout
        if current is not None and rollout_id != "current" and c.store.rollout(rollout_id):
            # It exists, but a later rollout started since: only that one can be acted on.
            abort(404, description=f"rollout {rollout_id} is not the current one: "
                  f"{current.rollout_id} started after it, and only the current rollout can "
                  f"be acted on")
        abort(404, description=str(exc))
    except TransitionError as exc:
        abort(409, description=str(exc))
    assert c.rollout is not None  # noqa: S101 - apply raised otherwise
    return jsonify(rollout_json(c.rollout))


@api.get("/series")
def series() -> Response:
    c = controller()
    try:
        minutes = max(1, min(int(request.args.get("minutes", "30")), 24 * 60))
        bucket = max(1, min(int(request.args.get("bucket_s", "30")), 3600))
    except ValueError:
        abort(400, description="minutes and bucket_s must be whole numbers")
    station = request.args.get("station")
    names = [station] if station else [r.station for r in c.store.stations()]
    since = datetime.now(UTC) - timedelta(minutes=minutes)
    points = c.store.evidence_series(names, since, bucket) if names else []
    return jsonify(points=[
        {"start": point.start.isoformat(), "parts": point.parts, "actions": point.actions,
         "shadow_pairs": point.shadow_pairs, "agreement_rate": point.agreement_rate}
        for point in points
    ])


@api.get("/rollouts/<rollout_id>/plan")
def rollout_plan(rollout_id: str) -> Response:
    """The plan a rollout runs, with each stage's exit conditions and gate tolerances: the
    dashboard shows the evidence against them."""
    c = controller()
    state = c.rollout
    if state is None or rollout_id not in ("current", state.rollout_id):
        stored = c.store.rollout(rollout_id) if rollout_id != "current" else None
        if stored is None:
            abort(404, description=f"no rollout {rollout_id}")
        state = RolloutState.model_validate_json(stored)
    return jsonify(rollout_id=state.rollout_id, plan=state.plan.model_dump(mode="json"))


@bundles.get("/<name>/<version>/<file_name>")
def bundle(name: str, version: str, file_name: str) -> Response:
    try:
        path = bundle_file(controller().config.bundles, name, version, file_name)
    except (OSError, ValueError):  # a name longer than the file system allows, a NUL byte ...
        path = None
    if path is None:
        abort(404)
    return send_file(path, mimetype="application/octet-stream", max_age=0)


def _metrics(c: Controller) -> bytes:
    registry = CollectorRegistry()
    Gauge("linesight_fleet_messages_received", "Messages received", registry=registry).set(
        c.counters.received)
    Gauge("linesight_fleet_messages_stored", "Messages stored", registry=registry).set(
        c.counters.stored)
    Gauge("linesight_fleet_messages_invalid", "Invalid messages dropped",
          registry=registry).set(c.counters.invalid)
    Gauge("linesight_fleet_receipts", "Receipts published", registry=registry).set(
        c.counters.receipts)
    Gauge("linesight_fleet_ingest_failed_batches",
          "Ingest batches that could not be stored (their stations send them again)",
          registry=registry).set(c.counters.failed_batches)
    Gauge("linesight_fleet_receipt_failures", "Receipt flushes that failed (tried again)",
          registry=registry).set(c.counters.failed_receipt_flushes)
    Gauge("linesight_fleet_receipts_owed", "Seq streams whose receipt waits to be sent",
          registry=registry).set(c.counters.receipts_owed)
    Gauge("linesight_fleet_inbox_bytes", "What waits in the inbox to be stored, in bytes",
          registry=registry).set(c.counters.inbox_bytes)
    Gauge("linesight_fleet_inbox_waits",
          "Times the network thread waited for room in a full inbox (the store fell behind)",
          registry=registry).set(c.counters.inbox_waits)
    disk = c.disk
    if disk.free_bytes is not None:  # measured (the check is on)
        Gauge("linesight_fleet_disk_free_bytes", "Free bytes on the disk holding data_dir",
              registry=registry).set(disk.free_bytes)
        Gauge("linesight_fleet_disk_low", "1 while free space is below min_free_mb",
              registry=registry).set(1 if disk.low else 0)
    online = Gauge("linesight_fleet_station_online", "Station online", ["station"],
                   registry=registry)
    behind = Gauge("linesight_fleet_station_clock_behind_seconds",
                   "How far the station's clock is behind the controller's (negative: ahead)",
                   ["station"], registry=registry)
    out_of_step = Gauge("linesight_fleet_station_out_of_step",
                        "1 while the station runs another model than its latest promoted "
                        "rollout made active", ["station"], registry=registry)
    clock = time.monotonic()
    now = datetime.now(UTC)
    for record in c.store.stations():
        name = record.station
        online.labels(name).set(1 if c.view(record, now).online else 0)
        offset = c.clock_offsets.behind_s(name, clock)
        if offset is not None:
            behind.labels(name).set(offset)
        out_of_step.labels(name).set(1 if c.alignment(record)[1] else 0)
    phase = Gauge("linesight_fleet_rollout_stage", "Current rollout stage index", ["rollout",
                                                                                  "phase"],
                  registry=registry)
    if c.rollout is not None:
        phase.labels(c.rollout.rollout_id, c.rollout.phase.value).set(c.rollout.stage)
    return generate_latest(registry)


def create_app(c: Controller) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.extensions["linesight.controller"] = c
    app.extensions["linesight.parts_missed"] = RecentPartsMissed(c.store)
    app.register_blueprint(api)
    app.register_blueprint(bundles)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(_metrics(c), mimetype="text/plain; version=0.0.4")

    @app.errorhandler(HTTPException)
    def api_routing_error(exc: HTTPException) -> HTTPException | tuple[Response, int]:
        """/api, or a path under it that no route has, or a method it does not take (found before
        the API's own handler could run), answers in JSON too; elsewhere Flask's page."""
        prefix = str(api.url_prefix)
        if request.path == prefix or request.path.startswith(prefix + "/"):
            return _http_error(exc)
        return exc

    from deploy.dashboard import dashboard  # the page and its assets

    app.register_blueprint(dashboard)

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    return app
