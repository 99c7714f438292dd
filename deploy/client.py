"""A small client of the controller's HTTP API, for the CLI, the demo and tests."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from enum import Enum
from typing import Any


class ControllerUnavailable(Exception):
    """Nothing answers at the controller's address."""


class NotAController(ControllerUnavailable):
    """Something answers at the controller's address, but not the way the controller's API does."""


class OutcomeUnknown(ControllerUnavailable):
    """A request that changes something went out, but no answer came back (the controller was
    too slow, or closed the connection: killed or restarted meanwhile): it may still happen."""


class ControllerError(Exception):
    """The controller answered with an error; the message is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"controller answered {status}: {message}")
        self.status = status


GATEWAY_GAVE_UP = frozenset({502, 504})
"""What a reverse proxy answers when the controller behind it did not (the controller itself
never does): a request it passed on may still have been done."""


class Unchecked(Enum):
    """A start that does not name the rollout it is meant to follow."""

    UNCHECKED = "unchecked"


UNCHECKED = Unchecked.UNCHECKED


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
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in GATEWAY_GAVE_UP:
                # Not the controller's answer: a proxy in front of it, after passing it on.
                said = (f"answered {exc.code} ({exc.reason}): a proxy in front of the "
                        "controller got no answer from it")
                if method == "GET":
                    raise ControllerUnavailable(self._cut_off(method, said)) from exc
                raise OutcomeUnknown(self._cut_off(method, said)) from exc
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            # Not JSON, or cut off: its status says enough.
            except (ValueError, AttributeError, OSError, http.client.HTTPException):
                message = exc.reason
            if exc.code == 401:
                message = f"{message} (the CLI gives it with --token or $LINESIGHT_API_TOKEN)"
            raise ControllerError(exc.code, str(message)) from exc
        except http.client.InvalidURL as exc:
            raise ValueError(f"controller URL {self.url!r} is not usable: {exc}") from exc
        except TimeoutError as exc:
            # The request went out (urllib wraps what fails while connecting or sending in a
            # URLError): it may still take effect, the controller is there but slow.
            said = f"the controller at {self.url} did not answer within {self.timeout:g} s"
            if method == "GET":
                raise ControllerUnavailable(f"{said}; it may be busy: try again") from exc
            raise OutcomeUnknown(
                f"{said}; what was asked may still happen: check with 'linesight fleet "
                "rollout status'"
            ) from exc
        except urllib.error.URLError as exc:
            raise ControllerUnavailable(
                f"no controller is running at {self.url} ({exc.reason}); start one with "
                "'linesight fleet serve' or pass --controller URL"
            ) from exc
        except ConnectionError as exc:
            # Connecting and sending fail inside a URLError: this came while waiting for the
            # answer, after the controller got the request (killed or restarted meanwhile).
            said = f"closed the connection without answering ({exc})"
            if method == "GET":
                raise ControllerUnavailable(self._cut_off(method, said)) from exc
            raise OutcomeUnknown(self._cut_off(method, said)) from exc
        except http.client.IncompleteRead as exc:
            # Its answer began, then the connection closed: the request was handled.
            said = (f"closed the connection partway through its answer ({len(exc.partial)} "
                    "bytes came)")
            if method == "GET":
                raise ControllerUnavailable(self._cut_off(method, said)) from exc
            raise OutcomeUnknown(self._cut_off(method, said)) from exc
        except http.client.HTTPException as exc:
            raise NotAController(self._not_a_controller(path, f"not HTTP: {exc!r}")) from exc
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise NotAController(self._not_a_controller(path, "not JSON")) from exc

    def _cut_off(self, method: str, what: str) -> str:
        said = f"the controller at {self.url} {what}"
        if method == "GET":
            return f"{said}; it may be restarting: try again"
        return (f"{said}; what was asked may still happen: check with 'linesight fleet "
                "rollout status' before asking again")

    def _not_a_controller(self, path: str, what: str) -> str:
        return (f"{self.url} does not answer like a Linesight controller ({path}: {what}); "
                "is --controller the fleet controller's address?")

    def _object(self, path: str, answer: Any, key: str) -> dict[str, Any]:
        if not isinstance(answer, dict) or key not in answer:
            raise NotAController(self._not_a_controller(path, f"no {key!r} in the answer"))
        return answer

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body or {})

    def stations(self) -> list[dict[str, Any]]:
        path = "/api/stations"
        stations = self._object(path, self.get(path), "stations")["stations"]
        if not isinstance(stations, list) or not all(isinstance(s, dict) for s in stations):
            raise NotAController(self._not_a_controller(path, "'stations' is not a list"))
        return stations

    def start_rollout(
        self, plan_yaml: str, name: str, version: str, *, by: str = "cli",
        after: str | None | Unchecked = UNCHECKED,
    ) -> dict[str, Any]:
        """`after`: the id of the latest rollout (None: none has run); the controller refuses
        the start (409) unless that is still the latest, so a start sent again cannot start a
        second rollout. UNCHECKED: start whatever rollout came before."""
        path = "/api/rollouts"
        body: dict[str, Any] = {
            "plan_yaml": plan_yaml, "candidate": {"name": name, "version": version}, "by": by,
        }
        if not isinstance(after, Unchecked):
            body["after"] = after
        return self._object(path, self.post(path, body), "rollout_id")

    def current(self) -> dict[str, Any] | None:
        path = "/api/rollouts/current"
        try:
            answer = self.get(path)
        except ControllerError as exc:
            if exc.status == 404:
                return None
            raise
        return self._object(path, answer, "rollout_id")

    def rollout(self, rollout_id: str = "current") -> dict[str, Any] | None:
        """The rollout of that id (ControllerError 404 for an unknown one), or the current one
        (None when no rollout has run)."""
        if rollout_id == "current":
            return self.current()
        path = f"/api/rollouts/{urllib.parse.quote(rollout_id, safe='')}"
        return self._object(path, self.get(path), "rollout_id")

    def act(self, action: str, rollout_id: str = "current", *, by: str = "cli",
            reason: str = "", stage: int | None = None) -> dict[str, Any]:
        """`stage` (an approval's): the index of the stage it is meant for; the controller
        refuses it unless that stage is the one waiting."""
        # Quoted: an id with a space or a slash is one path segment, refused by the controller.
        path = (f"/api/rollouts/{urllib.parse.quote(rollout_id, safe='')}/"
                f"{urllib.parse.quote(action, safe='')}")
        body: dict[str, Any] = {"by": by, "reason": reason}
        if stage is not None:
            body["stage"] = stage
        return self._object(path, self.post(path, body), "rollout_id")

    def realign(self, stations: list[str], *, by: str = "cli") -> dict[str, Any]:
        path = "/api/realign"
        return self._object(path, self.post(path, {"stations": stations, "by": by}),
                            "rollout_id")


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
