"""The supervisor's page: the final verdict on parts operators escalated, corrections of
operators' mistaken verdicts, and the station's automation level within what the fleet
allows."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from edge_agent.store import TooManyOpenRequests
from linesight.protocol import AutomationLevel, VerdictOutcome
from station_ui.app import current_operator, error_response, now_dt, supervisor_only, ui
from station_ui.config import AUTOMATION_ORDER
from station_ui.review import current_banners, form_problem, model_labels, shown_item
from station_ui.views import AUTOMATION_TEXT

blueprint = Blueprint("supervisor", __name__)
MAX_REASON = 500  # what a SetAutomation command carries
ESCALATIONS_SHOWN = 20
CORRECTABLE_SHOWN = 20
_FINAL_TEXT = {VerdictOutcome.PASS.value: "passed", VerdictOutcome.REJECT.value: "rejected"}


def _page(
    status: int = 200, *, error: str | None = None, reason: str = "",
    resolve_error: str | None = None, correct_error: str | None = None,
) -> BaseResponse:
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
    escalations = [
        (shown_item(escalation.review), escalation)
        for escalation in state.store.escalations(limit=ESCALATIONS_SHOWN)
    ]
    # Open until the station has made the change and saved it (a stopped station, or one whose
    # disk refuses the save, leaves them open: it makes them when it can).
    waiting = state.store.open_requests()
    page = render_template(
        "supervisor.html",
        escalations=escalations,
        resolve_error=resolve_error,
        correctable=state.store.correctable_verdicts(limit=CORRECTABLE_SHOWN),
        correct_error=correct_error,
        final_text=_FINAL_TEXT,
        escalation_count=state.store.escalation_count(),
        levels=levels,
        current=current,
        note=note,
        waiting=waiting,
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
    try:
        state.store.request_automation(level.value, reason, by=operator.badge)
    except TooManyOpenRequests as exc:
        return _page(409, error=f"Not recorded: {exc}.", reason=reason)
    flash(
        f"Asked the station to switch to '{level.value}'. It applies the change between two "
        "parts, saves it and reports it to the fleet; until then it is listed as waiting.",
        "ok",
    )
    return redirect(url_for("supervisor.supervisor_page"))


@dataclass(frozen=True)
class _FinalVerdict:
    """A supervisor's pass or reject as the form gave it, with the label it stands for."""

    part_id: str
    outcome: str
    label: str
    badge: str


def _final_verdict_form(what: str) -> _FinalVerdict | str:
    """The supervisor's final verdict from the posted form, or what is wrong with the form."""
    operator = current_operator()
    assert operator is not None  # noqa: S101 - @supervisor_only guarantees it
    part_id = request.form.get("part_id", "")
    outcome = request.form.get("outcome", "")
    problem = form_problem(part_id, outcome, _FINAL_TEXT, what)
    if problem is not None:
        return problem
    ok, defect = model_labels()
    return _FinalVerdict(part_id, outcome, ok if outcome == "pass" else defect, operator.badge)


@blueprint.post("/supervisor/resolve")
@supervisor_only
def resolve_escalation() -> BaseResponse:
    """The final pass or reject of an escalated part; published as the part's labelled Verdict."""
    given = _final_verdict_form("final verdict")
    if isinstance(given, str):
        return _page(400, resolve_error=given)
    part_id, outcome = given.part_id, given.outcome
    try:
        recorded = ui().store.resolve_escalation(part_id, given.badge, outcome, given.label,
                                                 now_dt())
    except KeyError:
        return error_response(404, "This part is not waiting for a supervisor.")
    if recorded:
        flash(f"Part {part_id} {_FINAL_TEXT[outcome]}: final verdict recorded.", "ok")
    else:
        flash(f"Part {part_id} already has a supervisor's verdict.", "warn")
    return redirect(url_for("supervisor.supervisor_page"))


@blueprint.post("/supervisor/correct")
@supervisor_only
def correct_verdict() -> BaseResponse:
    """The other outcome for a part an operator passed or rejected by mistake; published as the
    part's labelled Verdict, which the gates then count instead of the operator's."""
    given = _final_verdict_form("corrected verdict")
    if isinstance(given, str):
        return _page(400, correct_error=given)
    part_id, outcome = given.part_id, given.outcome
    try:
        recorded = ui().store.correct_verdict(part_id, given.badge, outcome, given.label,
                                              now_dt())
    except KeyError:
        return _page(404, correct_error=f"Part {part_id} has no pass or reject to correct "
                     "(any more): nothing was changed.")
    except ValueError:
        return _page(409, correct_error=f"Part {part_id} is {_FINAL_TEXT[outcome]} already: "
                     "nothing was changed.")
    if not recorded:
        flash(f"Part {part_id} already has a supervisor's verdict: nothing was changed.", "warn")
    elif outcome == "reject":
        flash(f"Part {part_id} corrected to rejected. It was passed on: take it off the line "
              "by hand if it can still be reached.", "ok")
    else:
        flash(f"Part {part_id} corrected to passed. It went to the reject path: put it back "
              "on the line by hand if it should go on.", "ok")
    return redirect(url_for("supervisor.supervisor_page") + "#corrections")
