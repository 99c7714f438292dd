"""The station UI's settings: one frozen record built by the CLI or by a test."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from linesight.protocol import AutomationLevel
from station_ui.clock import current_boot_id
from station_ui.security import LockPolicy

AUTOMATION_ORDER: tuple[AutomationLevel, ...] = tuple(AutomationLevel)
"""From least to most automated; the enum is declared in that order."""


@dataclass(frozen=True, slots=True)
class UiConfig:
    data_dir: Path
    secret_key: bytes = field(repr=False)
    idle_timeout_s: float = 300.0
    max_session_s: float = 12 * 3600.0
    """A session ends after this long even when busy: a forgotten badge does not live on."""
    max_automation: AutomationLevel = AutomationLevel.FULL
    """The highest level the fleet lets a supervisor choose on this station."""
    shift_hours: int = 8
    shift_anchor_hour: int = 6
    """Local hour at which one shift starts; the others follow every `shift_hours`."""
    outbox_warn: int = 500
    """Outbox depth above which the screen says messages are backing up."""
    stale_after_s: float = 5.0
    """A status snapshot older than this means the agent is not running."""
    ok_label: str = "ok"
    defect_label: str = "defect"
    """The labels a Pass and a Reject carry until the agent reports its model's own (the status
    snapshot's `model_labels`: e.g. good and ng)."""
    poll_interval_ms: int = 1500
    queue_preview: int = 12
    """How many waiting parts after the current one the screen lists."""
    secure_cookie: bool = False
    """Set when the UI is served over HTTPS; a kiosk on 127.0.0.1 speaks plain HTTP."""
    badge_lock: LockPolicy = LockPolicy(max_failures=5)
    address_lock: LockPolicy = LockPolicy(max_failures=20)
    """Looser than per badge: every operator of a kiosk signs in from the same address."""
    clock: Callable[[], float] = time.time
    """Seconds since the epoch: the time verdicts and shifts are dated by."""
    monotonic: Callable[[], float] = time.monotonic
    """What measures durations (idle time, the sign-in's limit, sign-in locks): no step of the
    wall clock moves it. Tests pass fakes of both to step time."""
    boot_id: str = field(default_factory=current_boot_id)
    """The boot `monotonic` counts from (see station_ui.clock)."""

    def __post_init__(self) -> None:
        if len(self.secret_key) < 16:
            raise ValueError("secret_key: at least 16 bytes required")
        if not (math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0):
            raise ValueError(f"idle_timeout_s: must be a number of seconds > 0, got "
                             f"{self.idle_timeout_s}")
        if not 1 <= self.shift_hours <= 24 or 24 % self.shift_hours:
            raise ValueError("shift_hours: must divide 24 (e.g. 8 or 12)")
        if not 0 <= self.shift_anchor_hour <= 23:
            raise ValueError("shift_anchor_hour: 0 to 23")
        if self.outbox_warn < 1:
            raise ValueError("outbox_warn: must be at least 1")
        if self.poll_interval_ms < 250:
            raise ValueError("poll_interval_ms: at least 250")

    def allows(self, level: AutomationLevel) -> bool:
        return AUTOMATION_ORDER.index(level) <= AUTOMATION_ORDER.index(self.max_automation)

    @property
    def allowed_levels(self) -> tuple[AutomationLevel, ...]:
        return tuple(level for level in AUTOMATION_ORDER if self.allows(level))

    @property
    def session_cookie_name(self) -> str:
        """One name per station screen, the same after a restart: browsers keep cookies per
        host, not per port, so screens served from one host (the demo's three on 127.0.0.1)
        would otherwise overwrite each other's session and sign each other out."""
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()
        return f"linesight_station_{digest[:12]}"
