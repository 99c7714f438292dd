"""The station's status: models, mode, automation level and this shift's numbers."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, render_template
from werkzeug.wrappers import Response as BaseResponse

from station_ui.app import now_dt, signed_in, ui
from station_ui.plots import rate_width, share_bar, throughput_chart
from station_ui.review import current_banners
from station_ui.views import AUTOMATION_TEXT, percent, shift_start

blueprint = Blueprint("status", __name__)
PLOT_WIDTH = 640


def _model(ref: Any) -> str:
    if not isinstance(ref, dict):
        return "none"
    return f"{ref.get('name', '?')} {ref.get('version', '?')}"


def _status_summary() -> dict[str, Any]:
    state = ui()
    loaded = state.store.load_status()
    document: dict[str, Any] = loaded[0] if loaded else {}
    automation = str(document.get("automation", "unknown"))
    return {
        "station": str(document.get("station", "this station")),
        "known": loaded is not None,
        "written": loaded[1] if loaded else None,
        "active": _model(document.get("active")),
        "candidate": _model(document.get("candidate")),
        "has_candidate": isinstance(document.get("candidate"), dict),
        "mode": str(document.get("mode", "none")),
        "canary_fraction": document.get("canary_fraction", 0.0),
        "automation": automation,
        "automation_text": AUTOMATION_TEXT.get(automation, automation),
        "automation_note": str(document.get("automation_note", "")),
        "broker_connected": bool(document.get("broker_connected", False)),
        "outbox_depth": document.get("outbox_depth", 0),
        "queue_depth": state.store.review_count(),
        "parts_inspected": document.get("parts_inspected", 0),
    }


@blueprint.get("/status")
@signed_in
def status_page() -> str:
    config = ui().config
    now = now_dt()
    since = shift_start(now, config.shift_anchor_hour, config.shift_hours)
    stats = ui().store.part_stats(since, now)
    actions = share_bar(
        [
            ("Passed", stats.actions.get("pass", 0), "seg-pass"),
            ("Rejected", stats.actions.get("reject", 0), "seg-reject"),
            ("To review", stats.actions.get("review", 0), "seg-review"),
        ],
        width=PLOT_WIDTH,
    )
    deciders = share_bar(
        [
            ("Running model", stats.decided_by.get("active", 0), "seg-active"),
            ("Model on trial", stats.decided_by.get("candidate", 0), "seg-candidate"),
            ("Operators", stats.decided_by.get("operator", 0), "seg-operator"),
            ("Fail-safe", stats.decided_by.get("failsafe", 0), "seg-failsafe"),
        ],
        width=PLOT_WIDTH,
    )
    rates = [
        (
            "Models agree (running vs. on trial)",
            percent(stats.agreement_rate),
            rate_width(stats.agreement_rate, width=PLOT_WIDTH),
            f"{stats.shadow_pairs} parts judged by both",
        ),
        (
            "Operators agree with the model",
            percent(stats.operator_model_agreement),
            rate_width(stats.operator_model_agreement, width=PLOT_WIDTH),
            f"{stats.operator_model_pairs} verdicts with a model label",
        ),
    ]
    hours = max((now - since).total_seconds() / 3600, 1 / 60)
    return render_template(
        "status.html",
        summary=_status_summary(),
        banners=current_banners(),
        since=since,
        stats=stats,
        parts_per_hour=f"{stats.parts / hours:.0f}",
        throughput=throughput_chart(stats.throughput, width=PLOT_WIDTH),
        actions=actions,
        deciders=deciders,
        rates=rates,
        plot_width=PLOT_WIDTH,
        shift_hours=config.shift_hours,
    )


@blueprint.get("/api/status")
@signed_in
def api_status() -> BaseResponse:
    summary = _status_summary()
    written = summary.pop("written")
    summary["written"] = written.isoformat() if written else None
    summary["banners"] = [banner.to_json() for banner in current_banners()]
    return jsonify(summary)
