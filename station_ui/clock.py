"""How the station screen measures how long ago something was, when the PC's wall clock may be
stepped: NTP correcting it after boot, an RTC that lost its time to a flat CMOS battery (it reads
2000 until corrected), a clock set to local time and read as UTC.

A duration is measured on the monotonic clock, which no step moves. The session cookie records
a moment as both clocks read it, and the boot it was read in: Linux's monotonic clock is one for
every process of a boot, so the screens of one station measure each other's moments with it,
but it starts again at each boot. Across a reboot only the wall clock is left; when it reads
earlier than the moment (it was stepped back meanwhile, or lost its time), nothing tells how
long ago that was, and the moment counts as too long ago: the screen signs out, it never stays
signed in for the length of the step.
"""

from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
WALL_SLACK_S = 2.0
"""A wall clock this much behind a moment of an earlier boot is taken as no time passed (two
machines' clocks, or one corrected by a small step): beyond it, as unknown."""


def current_boot_id(source: Path = _BOOT_ID_FILE) -> str:
    """The kernel's id of this boot; where it cannot be read, one for this process only (its
    moments are then measured by the monotonic clock only within the process)."""
    try:
        text = source.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or f"process-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Moment:
    """One instant as the wall clock (seconds since the epoch) and the monotonic clock of boot
    `boot` read it."""

    wall: float
    mono: float
    boot: str

    def to_cookie(self) -> list[float | str]:
        return [self.wall, self.mono, self.boot]


def from_cookie(value: object) -> Moment | None:
    """The moment a cookie recorded, or None for a value that is none. A bare number (a cookie
    of an earlier build) is a wall time of no known boot."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Moment(float(value), math.nan, "")
    if isinstance(value, list | tuple) and len(value) == 3:
        wall, mono, boot = value
        if (isinstance(wall, int | float) and isinstance(mono, int | float)
                and not isinstance(wall, bool) and not isinstance(mono, bool)
                and isinstance(boot, str)):
            return Moment(float(wall), float(mono), boot)
    return None


def seconds_since(then: Moment | None, now: Moment) -> float:
    """Seconds from `then` to `now`: on the monotonic clock within one boot, else on the wall
    clock; infinite when that cannot be known (no moment, or a wall clock stepped back past it
    across a reboot)."""
    if then is None:
        return math.inf
    if then.boot and then.boot == now.boot and math.isfinite(then.mono):
        return max(0.0, now.mono - then.mono)
    elapsed = now.wall - then.wall
    if not math.isfinite(elapsed) or elapsed < -WALL_SLACK_S:
        return math.inf
    return max(0.0, elapsed)


class SnapshotAge:
    """How long ago the agent last wrote its status snapshot, on the monotonic clock.

    The snapshot is dated by the wall clock when it is written; a wall clock stepped back would
    make a dead agent's last snapshot look fresh for the length of the step. So the age counts
    from when this screen first saw that snapshot (its wall-clock age then, never below 0), on
    the monotonic clock: a running agent rewrites it every second; one that stopped is shown
    as stopped `stale_after_s` later, whatever the wall clock does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written: float | None = None
        self._first_seen = 0.0
        self._age_then = 0.0

    def age_s(self, written: float, now: Moment) -> float:
        """Seconds since the snapshot written at wall time `written` was written."""
        with self._lock:
            if written != self._written:
                self._written = written
                self._first_seen = now.mono
                self._age_then = max(0.0, now.wall - written)
            return self._age_then + max(0.0, now.mono - self._first_seen)
