"""The reject gate: how a station tells the line to divert a part.

Integrators implement `RejectGate` for their PLC or diverter. Two ship: a logging gate (the
default, for stations whose PLC reads decisions from MQTT) and a webhook that POSTs a small JSON
document for every part. A failing gate is reported, never allowed to stop inspection.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import IO, Protocol

from edge_agent.config import LogRejectOutput, RejectOutputConfig, WebhookRejectOutput
from linesight.protocol import Action, DecidedBy, Decision

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartSignal:
    """What the line is told about one part: its decision, and the decision's seq in the
    outbox, None when the decision could not be stored (a full or failing disk): the line is
    told all the same, for a part to reject must never go on as if it had passed."""

    station: str
    part_id: str
    action: Action
    decided_by: DecidedBy
    label: str | None
    confidence: float | None
    seq: int | None

    @classmethod
    def of(cls, decision: Decision, *, stored: bool = True) -> PartSignal:
        return cls(decision.station, decision.part_id, decision.action, decision.decided_by,
                   decision.label, decision.confidence, decision.seq if stored else None)


class RejectGate(Protocol):
    def act(self, decision: PartSignal) -> None:
        """Called once per part after its decision; raise OSError when the device fails."""


class LoggingGate:
    def act(self, decision: PartSignal) -> None:
        log.debug("part %s: %s (%s)", decision.part_id, decision.action, decision.decided_by)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 as a GET without the body and take the target's answer
    for the POST's: here a redirect stays the HTTPError it is."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: Message, newurl: str,
    ) -> urllib.request.Request | None:
        return None


class WebhookGate:
    """POST {"station", "part_id", "action", "decided_by", "label", "confidence", "seq"}.

    Only a 2xx answer to the POST itself is success: redirects are not followed."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect)

    def act(self, decision: PartSignal) -> None:
        body = json.dumps(
            {
                "station": decision.station,
                "part_id": decision.part_id,
                "action": decision.action.value,
                "decided_by": decision.decided_by.value,
                "label": decision.label,
                "confidence": decision.confidence,
                "seq": decision.seq,
            }
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - URL scheme validated by the config
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                if not 200 <= response.status < 300:
                    raise OSError(f"reject webhook {self.url} answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise OSError(
                    f"reject webhook {self.url} answered HTTP {exc.code}, a redirect to "
                    f"{exc.headers.get('Location', '(no Location)')}; redirects are not "
                    "followed: configure the URL that takes the POST"
                ) from exc
            raise OSError(f"reject webhook {self.url} answered HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise OSError(f"reject webhook {self.url} failed: {exc.reason}") from exc
        except http.client.HTTPException as exc:  # BadStatusLine, IncompleteRead, ...
            raise OSError(f"reject webhook {self.url} gave a malformed answer: {exc!r}") from exc
        except OSError as exc:  # a time-out or reset while the answer is read
            raise OSError(f"reject webhook {self.url} failed: {exc}") from exc


def build_gate(config: RejectOutputConfig) -> RejectGate:
    if isinstance(config, WebhookRejectOutput):
        return WebhookGate(config.url, config.timeout_s)
    if isinstance(config, LogRejectOutput):
        return LoggingGate()
    raise ValueError(f"unknown reject output {config!r}")


class InlineGate:
    """A gate that cannot block (the logging default) runs on the thread that stored the
    decision: a thread hand-off per part would cost more than the gate itself."""

    def __init__(self, gate: RejectGate, on_error: Callable[[str], None],
                 on_ok: Callable[[], None] = lambda: None) -> None:
        self.gate = gate
        self.on_error = on_error
        self.on_ok = on_ok

    def act(self, decision: PartSignal) -> None:
        try:
            self.gate.act(decision)
        except OSError as exc:
            self.on_error(str(exc))
        except Exception as exc:  # a gate's bug must not stop inspection either  # noqa: BLE001
            log.exception("reject gate failed on part %s", decision.part_id)
            self.on_error(f"reject gate failed: {type(exc).__name__}: {exc}")
        else:
            self.on_ok()

    def close(self, timeout: float = 5.0) -> None:
        """Nothing is ever queued."""


def start_gate(gate: RejectGate, on_error: Callable[[str], None],
               on_ok: Callable[[], None] = lambda: None) -> InlineGate | BackgroundGate:
    """The logging gate inline; anything that talks to the line (a webhook) on its own thread."""
    if isinstance(gate, LoggingGate):
        return InlineGate(gate, on_error, on_ok)
    return BackgroundGate(gate, on_error, on_ok)


class BackgroundGate:
    """Runs a gate on a thread of its own, so a slow or dead PLC endpoint never holds up the
    outbox commit or the inspection loop; failures are reported through `on_error`, and the
    thread goes on with the next part whatever one part's signal raised."""

    def __init__(self, gate: RejectGate, on_error: Callable[[str], None],
                 on_ok: Callable[[], None] = lambda: None, max_backlog: int = 1000) -> None:
        self.gate = gate
        self.on_error = on_error
        self._inline = InlineGate(gate, on_error, on_ok)  # what the thread runs per decision
        self._queue: queue.Queue[PartSignal | None] = queue.Queue(max_backlog)
        self._given_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reject-gate", daemon=True)
        self._thread.start()

    def act(self, decision: PartSignal) -> None:
        try:
            self._queue.put_nowait(decision)
        except queue.Full:
            self.on_error(f"reject output is {self._queue.maxsize} parts behind; part "
                          f"{decision.part_id} not signalled")

    def close(self, timeout: float = 5.0) -> None:
        """Signal the parts still queued for up to `timeout` seconds, then give up on the rest
        (their decisions are stored and published): a dead endpoint never holds up a shutdown."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._given_up.set()  # the thread ends after the part it is signalling
            log.warning("reject output: gave up after %.0f s with about %d parts not signalled",
                        timeout, self._queue.qsize())

    def _run(self) -> None:
        while not self._given_up.is_set() and (decision := self._queue.get()) is not None:
            try:
                self._inline.act(decision)
            except Exception:  # on_error or on_ok raised: the next part still goes out  # noqa: BLE001
                log.exception("reject output: reporting part %s failed", decision.part_id)
