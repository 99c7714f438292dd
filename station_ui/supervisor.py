"""The supervisor's page: change the station's automation level within what the fleet allows."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from linesight.protocol import AutomationLevel
from station_ui.app import current_operator, error_response, supervisor_only, ui
from station_ui.config import AUTOMATION_ORDER
from station_ui.review import current_banners
from station_ui.views import AUTOMATION_TEXT

blueprint = Blueprint("supervisor", __name__)
MAX_REASON = 500  # what a SetAutomation command carries


def _page(status: int = 200, *, error: str | None = None, reason: str = "") -> BaseResponse:
    state = ui()
    loaded = state.store.load_status()
    current = str(loaded[0].get("automation", "")) if loaded else ""
    note = str(loaded[0].get("automation_note", "")) if loaded else ""
    levels = [
        {
            "value": level.value,
            "title": AUTOMATION_TEXT[level.value].partition(": ")[0],
            "text": AUTOMATION_TEXT[level.value].partition(": ")[2],
            "allowed": state.config.allows(level),
            "current": level.value == current,
        }
        for level in AUTOMATION_ORDER
    ]
    page = render_template(
        "supervisor.html",
        levels=levels,
        current=current,
        note=note,
        max_automation=state.config.max_automation.value,
        error=error,
        reason=reason,
        max_reason=MAX_REASON,
        banners=current_banners(),
    )
    return BaseResponse(page, status=status, content_type="text/html; charset=utf-8")


@blueprint.get("/supervisor")
@supervisor_only
def supervisor_page() -> BaseResponse:
    return _page()


@blueprint.post("/supervisor/automation")
@supervisor_only
def change_automation() -> BaseResponse:
    state = ui()
    operator = current_operator()
    assert operator is not None  # noqa: S101 - @supervisor_only guarantees it
    reason = request.form.get("reason", "").strip()
    try:
        level = AutomationLevel(request.form.get("level", ""))
    except ValueError:
        return _page(400, error="Choose an automation level.", reason=reason)
    if not state.config.allows(level):
        return error_response(
            403,
            f"The fleet allows at most '{state.config.max_automation.value}' on this station; "
            f"'{level.value}' is refused.",
        )
    if not reason:
        return _page(400, error="Give a reason: it is recorded with the change.", reason=reason)
    if len(reason) > MAX_REASON:
        return _page(
            400, error=f"Keep the reason under {MAX_REASON} characters.", reason=reason[:MAX_REASON]
        )
    state.store.request_automation(level.value, reason, by=operator.badge)
    flash(
        f"Asked the station to switch to '{level.value}'. It applies the change between two "
        "parts and reports it to the fleet.",
        "ok",
    )
    return redirect(url_for("supervisor.supervisor_page"))
