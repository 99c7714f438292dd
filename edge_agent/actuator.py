"""The reject gate: how a station tells the line to divert a part.

Integrators implement `RejectGate` for their PLC or diverter. Two ship: a logging gate (the
default, for stations whose PLC reads decisions from MQTT) and a webhook that POSTs a small JSON
document for every part. A failing gate is reported, never allowed to stop inspection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Protocol

from edge_agent.config import LogRejectOutput, RejectOutputConfig, WebhookRejectOutput
from linesight.protocol import Decision

log = logging.getLogger(__name__)


class RejectGate(Protocol):
    def act(self, decision: Decision) -> None:
        """Called once per part after its decision; raise OSError when the device fails."""


class LoggingGate:
    def act(self, decision: Decision) -> None:
        log.debug("part %s: %s (%s)", decision.part_id, decision.action, decision.decided_by)


class WebhookGate:
    """POST {"station", "part_id", "action", "decided_by", "label", "confidence", "seq"}."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def act(self, decision: Decision) -> None:
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
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                if response.status >= 300:
                    raise OSError(f"reject webhook answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise OSError(f"reject webhook answered HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise OSError(f"reject webhook {self.url} failed: {exc.reason}") from exc


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

    def act(self, decision: Decision) -> None:
        try:
            self.gate.act(decision)
        except OSError as exc:
            self.on_error(str(exc))
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
    outbox commit or the inspection loop; failures are reported through `on_error`."""

    def __init__(self, gate: RejectGate, on_error: Callable[[str], None],
                 on_ok: Callable[[], None] = lambda: None, max_backlog: int = 1000) -> None:
        self.gate = gate
        self.on_error = on_error
        self._inline = InlineGate(gate, on_error, on_ok)  # what the thread runs per decision
        self._queue: queue.Queue[Decision | None] = queue.Queue(max_backlog)
        self._thread = threading.Thread(target=self._run, name="reject-gate", daemon=True)
        self._thread.start()

    def act(self, decision: Decision) -> None:
        try:
            self._queue.put_nowait(decision)
        except queue.Full:
            self.on_error(f"reject output is {self._queue.maxsize} parts behind; part "
                          f"{decision.part_id} not signalled")

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (decision := self._queue.get()) is not None:
            self._inline.act(decision)
