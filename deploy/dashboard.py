"""The fleet dashboard: one page over the JSON API.

The page is static HTML; `deploy/static/dashboard.js` fills it from the API every two seconds,
putting every value in with textContent. The server only tells the page which rollout to show
and whether requests need the API token (never the token itself).
"""

from __future__ import annotations

import re

from flask import Blueprint, abort, current_app, render_template

from deploy.controller import Controller

dashboard = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
                      static_url_path="/static")

# Ids the controller makes look like r-20250101-120000-abc123; anything else is not a rollout.
_ROLLOUT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REFRESH_MS = 2000


def _token_required() -> bool:
    controller: Controller = current_app.extensions["linesight.controller"]
    return controller.config.api_token is not None


@dashboard.get("/")
def index() -> str:
    return render_template("dashboard.html", rollout_id="", token_required=_token_required(),
                           refresh_ms=REFRESH_MS)


@dashboard.get("/rollouts/<rollout_id>")
def rollout_page(rollout_id: str) -> str:
    if not _ROLLOUT_ID.match(rollout_id):
        abort(404)
    return render_template("dashboard.html", rollout_id=rollout_id,
                           token_required=_token_required(), refresh_ms=REFRESH_MS)
