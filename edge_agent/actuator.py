"""The reject gate: how a station tells the line to divert a part.

Integrators implement `RejectGate` for their PLC or diverter. Two ship: a logging gate (the
default, for stations whose PLC reads decisions from MQTT) and a webhook that POSTs a small JSON
document for every part. A failing gate is reported, never allowed to stop inspection.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
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
        except urllib.error.URLError as exc:
            raise OSError(f"reject webhook {self.url} failed: {exc.reason}") from exc


def build_gate(config: RejectOutputConfig) -> RejectGate:
    if isinstance(config, WebhookRejectOutput):
        return WebhookGate(config.url, config.timeout_s)
    if isinstance(config, LogRejectOutput):
        return LoggingGate()
    raise ValueError(f"unknown reject output {config!r}")
