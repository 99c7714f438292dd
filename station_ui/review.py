"""The review queue: the part to judge, its image, the verdict, and the JSON the page polls."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from edge_agent.store import ReviewRow
from linesight.protocol import PART_ID_MAX_LENGTH, VerdictOutcome
from station_ui.app import (
    current_operator,
    error_response,
    now_dt,
    now_moment,
    signed_in,
    ui,
    wants_json,
)
from station_ui.views import Banner, QueueItem, banners, queue_item, verdict_labels

blueprint = Blueprint("review", __name__)

_OUTCOME_TEXT = {
    VerdictOutcome.PASS.value: "passed",
    VerdictOutcome.REJECT.value: "rejected",
    VerdictOutcome.ESCALATE.value: "escalated to the supervisor",
}
_BUTTON_TEXT = {
    VerdictOutcome.PASS.value: "Pass",
    VerdictOutcome.REJECT.value: "Reject",
    VerdictOutcome.ESCALATE.value: "Unsure",
}


def shown_item(row: ReviewRow) -> QueueItem:
    """The part as a screen shows it; an image the store names but the disk no longer holds
    (removed by hand, a store restored without its images) shows as no image, not a broken one."""
    item = queue_item(row)
    if row.image_path is not None and not row.image_path.is_file():
        return replace(item, has_image=False)
    return item


def _queue() -> tuple[list[QueueItem], int]:
    state = ui()
    rows = state.store.pending_reviews(limit=1 + state.config.queue_preview, oldest_first=True)
    return [shown_item(row) for row in rows], state.store.review_count()


def current_banners() -> list[Banner]:
    state = ui()
    status = state.store.load_status()
    now = now_moment(state.config)
    age = None if status is None else state.snapshot_age.age_s(status[1].timestamp(), now)
    return banners(
        status,
        datetime.fromtimestamp(now.wall, UTC),
        stale_after_s=state.config.stale_after_s,
        outbox_warn=state.config.outbox_warn,
        age_s=age,
    )


def model_labels() -> tuple[str, str]:
    """The labels a Pass and a Reject carry on this station now (the running model's own)."""
    state = ui()
    loaded = state.store.load_status()
    return verdict_labels(
        loaded[0] if loaded else None, state.config.ok_label, state.config.defect_label
    )


@blueprint.get("/")
@signed_in
def queue() -> str:
    items, count = _queue()
    return render_template(
        "queue.html",
        current=items[0] if items else None,
        upcoming=items[1:],
        count=count,
        banners=current_banners(),
    )


@blueprint.get("/partial/current")
@signed_in
def current_card() -> str:
    """The current part's card alone, swapped in by the page when the head of the queue moves."""
    items, count = _queue()
    return render_template(
        "_current.html", current=items[0] if items else None, count=count
    )


@blueprint.get("/api/queue")
@signed_in
def api_queue() -> BaseResponse:
    """The queue as the page polls it. `showing` names the part on the operator's screen: the
    page keeps that card until the part is judged (here or on another screen), even when a part
    captured earlier (a late disagreement) has become the head meanwhile."""
    items, count = _queue()
    showing = request.args.get("showing", "")
    row = ui().store.review(showing) if 1 <= len(showing) <= PART_ID_MAX_LENGTH else None
    payload: dict[str, Any] = {
        "count": count,
        "head": items[0].part_id if items else None,
        "showing_waiting": row is not None and row.outcome is None,
        "items": [item.to_json(f"{item.created.astimezone():%H:%M:%S}") for item in items],
        "banners": [banner.to_json() for banner in current_banners()],
    }
    return jsonify(payload)


@blueprint.get("/image")
@signed_in
def image() -> BaseResponse:
    """A part's JPEG, looked up by part id in the store; the request never names a file."""
    part_id = request.args.get("part", "")
    state = ui()
    found = state.store.image_path(part_id) if 1 <= len(part_id) <= PART_ID_MAX_LENGTH else None
    if found is None:
        return error_response(404, "No image for this part.")
    images = state.store.images_dir.resolve()
    path = Path(found).resolve()
    if path.parent != images or not path.is_file():
        return error_response(404, "No image for this part.")
    response = send_file(path, mimetype="image/jpeg", max_age=3600, conditional=True)
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


def form_problem(part_id: str, outcome: str, outcomes: Collection[str], kind: str) -> str | None:
    """What is wrong with a verdict form's fields, naming the field; None when nothing is."""
    if not part_id:
        return "Not recorded: the form names no part. Reload the page and try again."
    if len(part_id) > PART_ID_MAX_LENGTH:
        return (f"Not recorded: a part id is at most {PART_ID_MAX_LENGTH} characters, "
                f"this one has {len(part_id)}.")
    *others, last = (_BUTTON_TEXT[choice] for choice in outcomes)
    choices = f"{', '.join(others)} or {last}"
    if not outcome:
        return f"Not recorded: no {kind} given. Choose {choices}."
    if outcome not in outcomes:
        shown = outcome if len(outcome) <= 16 else outcome[:16] + "..."
        return f"Not recorded: {shown!r} is not a {kind}. Choose {choices}."
    return None


@blueprint.post("/verdict")
@signed_in
def verdict() -> BaseResponse:
    state = ui()
    operator = current_operator()
    assert operator is not None  # noqa: S101 - @signed_in guarantees it
    part_id = request.form.get("part_id", "")
    outcome = request.form.get("outcome", "")
    problem = form_problem(part_id, outcome, _OUTCOME_TEXT, "verdict")
    if problem is not None:
        return error_response(400, problem)
    ok, defect = model_labels()
    label = {VerdictOutcome.PASS.value: ok, VerdictOutcome.REJECT.value: defect}.get(outcome)
    try:
        recorded = state.store.record_verdict(part_id, operator.badge, outcome, label, now_dt())
    except KeyError:
        return error_response(404, "This part is not in the review queue.")
    result = "recorded" if recorded else "already_judged"
    if wants_json():
        return jsonify({"result": result, "part_id": part_id, "outcome": outcome})
    if recorded:
        flash(f"Part {part_id} {_OUTCOME_TEXT[outcome]}.", "ok")
    else:
        flash(f"Part {part_id} was already judged.", "warn")
    return redirect(url_for("review.queue"))
