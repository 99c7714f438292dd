"""The station UI's app factory: session, CSRF, idle sign-out and headers for every blueprint.

The UI is its own process beside the agent; the only thing the two share is the station
store, so a fault here can never stop inspection.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from flask import (
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from edge_agent.store import OperatorRow, StationStore, StoreError
from station_ui.clock import Moment, SnapshotAge, from_cookie, seconds_since
from station_ui.config import UiConfig
from station_ui.security import (
    SignInLimiter,
    apply_security_headers,
    csrf_matches,
    hash_fingerprint,
    new_csrf_token,
)
from station_ui.sessions import LiveSessions, remove_old_record

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Requests the page makes on its own (polling, images) must not count as the operator being
# active, or an open page would never sign out.
_PASSIVE_ENDPOINTS = frozenset(
    {"review.api_queue", "review.current_card", "review.image", "status.api_status"}
)


@dataclass(slots=True)
class UiState:
    config: UiConfig
    store: StationStore
    limiter: SignInLimiter
    sessions: LiveSessions
    """The sessions signed in on the station's screens: a cookie whose id is not live is
    refused."""
    snapshot_age: SnapshotAge
    """How old the agent's status snapshot is, whatever the wall clock does."""


def ui() -> UiState:
    return cast(UiState, current_app.extensions["station_ui"])


def now_dt() -> datetime:
    return datetime.fromtimestamp(ui().config.clock(), UTC)


def now_moment(config: UiConfig) -> Moment:
    """Now, as the cookie records it: idle time and the sign-in's limit are measured on the
    monotonic clock, so a step of the wall clock neither ends a session nor lengthens it."""
    return Moment(config.clock(), config.monotonic(), config.boot_id)


def current_operator() -> OperatorRow | None:
    return cast(OperatorRow | None, g.get("operator"))


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def error_response(status: int, message: str) -> BaseResponse:
    if wants_json():
        response = jsonify({"error": message})
        response.status_code = status
        return response
    return Response(
        render_template("error.html", status=status, message=message), status=status
    )


def signed_in(view: F) -> F:
    """Any signed-in operator; otherwise the sign-in page (or 401 for the JSON API)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_operator() is None:
            reason = g.get("signed_out_reason") or "required"
            if wants_json():
                # The page's script sends the operator to the sign-in page with this reason.
                response = jsonify({"error": "Signed out. Please sign in again.", "reason": reason})
                response.status_code = 401
                return response
            if request.method not in _SAFE_METHODS:
                return error_response(401, "Signed out. Please sign in again.")
            return redirect(url_for("auth.login", reason=reason, next=request.path))
        return view(*args, **kwargs)

    return cast(F, wrapper)


def supervisor_only(view: F) -> F:
    @signed_in
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        operator = current_operator()
        if operator is None or operator.role != "supervisor":
            return error_response(403, "Only a supervisor may do this.")
        return view(*args, **kwargs)

    return cast(F, wrapper)


def start_session(operator: OperatorRow) -> None:
    state = ui()
    now = now_moment(state.config).to_cookie()
    state.sessions.end(session.get("sid"))  # a sign-in over a live session replaces it
    session.clear()
    # A fresh CSRF token at sign-in: a token seen before sign-in is worth nothing after it.
    session.update(
        sid=state.sessions.start(),
        badge=operator.badge,
        fp=hash_fingerprint(operator.pin_hash),
        started=now,
        seen=now,
        csrf=new_csrf_token(),
    )


def end_session() -> None:
    """Sign out: the server forgets the session, so a copy of the cookie is refused too."""
    ui().sessions.end(session.get("sid"))
    token = session.get("csrf")
    session.clear()
    # Keep the CSRF token so a form already on screen gets "signed out", not "bad token".
    session["csrf"] = token or new_csrf_token()


def _load_operator() -> None:
    state = ui()
    g.operator = None
    badge = session.get("badge")
    if not isinstance(badge, str):
        return
    now = now_moment(state.config)
    # Timed out first: the store forgets a sign-in at its time limit too, and the operator is
    # told which limit it was, not that they were signed out elsewhere.
    if seconds_since(from_cookie(session.get("seen")), now) > state.config.idle_timeout_s:
        reason = "idle"
    elif seconds_since(from_cookie(session.get("started")), now) > state.config.max_session_s:
        reason = "expired"
    elif not state.sessions.is_live(session.get("sid")):
        reason = "signed_out"  # signed out elsewhere (or a cookie from before sign-ins had an id)
    else:
        operator = state.store.operator(badge)
        # A deleted operator, a PIN reset or a role change ends the sessions of that badge.
        if operator is not None and hash_fingerprint(operator.pin_hash) == session.get("fp"):
            g.operator = operator
            if request.endpoint not in _PASSIVE_ENDPOINTS:
                session["seen"] = now.to_cookie()
            return
        reason = "signed_out"
    end_session()
    g.signed_out_reason = reason


def _before_request() -> BaseResponse | None:
    if request.endpoint == "static" or request.routing_exception is not None:
        return None  # a path or method no route takes: Flask answers 404 or 405
    if "csrf" not in session:
        session["csrf"] = new_csrf_token()
    _load_operator()
    if request.method not in _SAFE_METHODS:
        given = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not csrf_matches(session.get("csrf"), given):
            if request.endpoint == "auth.login_submit" and current_operator() is not None:
                # The second tap of a double tap on Sign in, sent after the first one signed
                # in and renewed the token: nothing is done with the form; on to the page
                # (the sign-in page sends a signed-in operator to a checked `next`).
                return redirect(url_for("auth.login", next=request.form.get("next", "/")))
            return error_response(
                400,
                "This form is out of date or did not come from this screen (security token "
                "missing or wrong). Reload the page and try again.",
            )
    return None


def _after_request(response: Response) -> Response:
    apply_security_headers(response)
    if request.endpoint != "static":
        # A shared kiosk: after sign-out, Back must not show the previous operator's pages.
        response.headers["Cache-Control"] = "no-store"
    return response


def _store_failed(exc: Exception) -> BaseResponse:
    """The store is locked past its busy timeout or failing: say so, and that nothing was
    saved, instead of a bare 500 (the operator must know a verdict did not count)."""
    log.warning("the station store failed on %s %s: %s", request.method, request.path, exc)
    if request.method in _SAFE_METHODS:
        message = f"The station's store cannot be read just now ({exc})."
    else:
        done = "Not signed in" if request.endpoint == "auth.login_submit" else "Not recorded"
        message = f"{done}: the station's store is busy or failing ({exc}). Nothing was saved."
    return error_response(
        503, f"{message} Try again in a moment; call maintenance if this keeps happening."
    )


def _count(read: Callable[[], int]) -> int:
    try:
        return read()
    except (sqlite3.Error, StoreError):
        return 0  # only the top bar's badge: the page that failed on the store says so itself


def _template_globals() -> dict[str, Any]:
    operator = current_operator()
    supervisor = operator is not None and operator.role == "supervisor"
    return {
        "operator": operator,
        "queue_count": _count(ui().store.review_count) if operator is not None else 0,
        "escalated_count": _count(ui().store.escalation_count) if supervisor else 0,
        "csrf_token": session.get("csrf", ""),
        "poll_interval_ms": ui().config.poll_interval_ms,
    }


def create_app(config: UiConfig, store: StationStore | None = None) -> Flask:
    """The UI for the station whose store lives in `config.data_dir`.

    Pass `store` to share an already open store (tests); otherwise the app opens its own.
    """
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key,
        SESSION_COOKIE_NAME=config.session_cookie_name,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=config.secure_cookie,
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=config.max_session_s),
        MAX_CONTENT_LENGTH=64 * 1024,
        SEND_FILE_MAX_AGE_DEFAULT=timedelta(hours=1),
        TEMPLATES_AUTO_RELOAD=False,
    )
    store = store if store is not None else StationStore(config.data_dir)
    remove_old_record(config.data_dir)
    app.extensions["station_ui"] = UiState(
        config=config,
        store=store,
        limiter=SignInLimiter(config.monotonic),
        sessions=LiveSessions(store, config.clock, config.max_session_s),
        snapshot_age=SnapshotAge(),
    )

    from station_ui import auth, review, status, supervisor

    app.register_blueprint(auth.blueprint)
    app.register_blueprint(review.blueprint)
    app.register_blueprint(status.blueprint)
    app.register_blueprint(supervisor.blueprint)
    app.before_request(_before_request)
    app.after_request(_after_request)
    app.context_processor(_template_globals)

    app.register_error_handler(sqlite3.Error, _store_failed)
    app.register_error_handler(StoreError, _store_failed)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> BaseResponse:
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.template_filter("local_time")
    def _local_time(moment: datetime) -> str:
        return f"{moment.astimezone():%H:%M:%S}"

    @app.template_filter("local_hm")
    def _local_hm(moment: datetime) -> str:
        return f"{moment.astimezone():%H:%M}"

    return app
