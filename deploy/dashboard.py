"""The fleet dashboard: one page over the JSON API."""

from __future__ import annotations

from flask import Blueprint, render_template

dashboard = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
                      static_url_path="/static")


@dashboard.get("/")
def index() -> str:
    return render_template("dashboard.html")
