"""A small client of the controller's HTTP API, for the CLI, the demo and tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class ControllerUnavailable(Exception):
    """Nothing answers at the controller's address."""


class ControllerError(Exception):
    """The controller answered with an error; the message is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"controller answered {status}: {message}")
        self.status = status


class ControllerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"controller URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ControllerError(exc.code, str(message)) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ControllerUnavailable(
                f"no controller is running at {self.url} ({reason}); start one with "
                "'linesight fleet serve' or pass --controller URL"
            ) from exc

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body or {})

    def start_rollout(self, plan_yaml: str, name: str, version: str) -> dict[str, Any]:
        result: dict[str, Any] = self.post(
            "/api/rollouts",
            {"plan_yaml": plan_yaml, "candidate": {"name": name, "version": version}},
        )
        return result

    def current(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.get("/api/rollouts/current")
        except ControllerError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def act(self, action: str, rollout_id: str = "current", *, by: str = "cli",
            reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.post(
            f"/api/rollouts/{rollout_id}/{action}", {"by": by, "reason": reason}
        )
        return result


def format_rollout(doc: dict[str, Any]) -> str:
    """A rollout as a few lines for a terminal."""
    candidate = doc["candidate"]
    lines = [
        f"rollout {doc['rollout_id']}  {candidate['name']} {candidate['version']}  "
        f"plan {doc['plan']}  phase {doc['phase_detail']}"
    ]
    for stage in doc["stages"]:
        marker = "▶" if stage["index"] == doc["stage"] and doc["phase"] not in (
            "promoted", "rolled_back", "aborted") else " "
        stations = ", ".join(stage["stations"]) or "-"
        lines.append(
            f" {marker} {stage['index'] + 1}. {stage['name']:<28} {stage['mode']:<10} "
            f"{stage['status']:<16} {stations}"
        )
    evidence = doc.get("evidence")
    if evidence and doc["phase"] not in ("promoted", "rolled_back", "aborted"):
        agreement = evidence["agreement_rate"]
        diff = evidence["error_diff_estimate"]
        upper = evidence["error_diff_upper"]
        lines.append(
            f"   parts {evidence['parts']}/{evidence['min_parts']}  "
            f"agreement {agreement:.1%}  " if agreement is not None else
            f"   parts {evidence['parts']}/{evidence['min_parts']}  "
        )
        lines[-1] += (
            f"labelled disagreements {evidence['labelled_disagreements']}/"
            f"{evidence['min_labelled_disagreements']}  gate {evidence['gate']}"
            f"/{evidence['escape_gate']}"
        )
        if diff is not None and upper is not None:
            lines.append(f"   error difference {diff:+.2%} (upper bound {upper:+.2%})")
    if doc.get("reason"):
        lines.append(f"   {doc['reason']}")
    return "\n".join(lines)
