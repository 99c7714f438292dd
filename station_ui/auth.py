"""Sign-in with badge id and PIN, sign-out, and the limit on failed sign-ins."""

from __future__ import annotations

import math
import re

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from edge_agent.store import OperatorRow
from station_ui.app import current_operator, end_session, start_session, ui
from station_ui.security import verify_decoy, verify_pin

blueprint = Blueprint("auth", __name__)
# Only our own pages are a place to return to after sign-in: never another site.
_LOCAL_NEXT = re.compile(r"/(status|supervisor)?")
_MAX_FIELD = 64

_REASONS = {
    "idle": "You were signed out after a while without activity.",
    "signed_out": "Signed out.",
}


def _next_target() -> str:
    target = request.values.get("next", "/")
    return target if _LOCAL_NEXT.fullmatch(target) else "/"


def _render(status: int = 200, *, error: str | None = None, badge: str = "") -> BaseResponse:
    reason = request.args.get("reason", "")
    if reason == "expired":
        hours = ui().config.max_session_s / 3600
        notice: str | None = f"Your sign-in reached its {hours:g}-hour limit. Please sign in again."
    else:
        notice = _REASONS.get(reason)
    page = render_template(
        "login.html", error=error, notice=notice, badge=badge, next=_next_target()
    )
    return BaseResponse(page, status=status, content_type="text/html; charset=utf-8")


def _wait_text(seconds: float) -> str:
    whole = math.ceil(seconds)
    return f"{whole} s" if whole < 120 else f"{math.ceil(whole / 60)} min"


@blueprint.get("/login")
def login() -> BaseResponse:
    if current_operator() is not None:
        return redirect(_next_target())
    return _render()


def _too_many(seconds: float, badge: str) -> BaseResponse:
    return _render(
        429, error=f"Too many wrong sign-ins. Try again in {_wait_text(seconds)}.", badge=badge
    )


def _checked_operator(badge: str, pin: str) -> OperatorRow | None:
    """The operator whose badge and PIN these are, or None (as slow for an unknown badge)."""
    operator = ui().store.operator(badge)
    if operator is None:
        verify_decoy(pin)
        return None
    return operator if verify_pin(pin, operator.pin_hash) else None


@blueprint.post("/login")
def login_submit() -> BaseResponse:
    state = ui()
    badge = request.form.get("badge", "").strip()[:_MAX_FIELD]
    pin = request.form.get("pin", "")[:_MAX_FIELD]
    if not badge or not pin:
        return _render(400, error="Enter your badge id and your PIN.", badge=badge)
    limits = {
        f"badge:{badge}": state.config.badge_lock,
        f"addr:{request.remote_addr or '?'}": state.config.address_lock,
    }
    # The try is reserved before the PIN is checked, in one step with the check of the limit:
    # sign-ins sent side by side cannot all pass the check before the first failure counts.
    waiting = state.limiter.begin(limits)
    if waiting > 0:
        return _too_many(waiting, badge)
    try:
        operator = _checked_operator(badge, pin)
    except BaseException:
        for key in limits:  # the store failed: the PIN was not checked, the try is given back
            state.limiter.release(key)
        raise
    if operator is None:
        locked = max(state.limiter.fail(key, policy) for key, policy in limits.items())
        if locked > 0:
            return _too_many(locked, badge)
        return _render(401, error="Badge id or PIN not recognised.", badge=badge)
    for key in limits:
        state.limiter.succeed(key)
    start_session(operator)
    return redirect(_next_target())


@blueprint.post("/logout")
def logout() -> BaseResponse:
    end_session()
    return redirect(url_for("auth.login", reason="signed_out"))
