"""Free space on a file system: when it counts as low, and how a size reads. Pure logic, shared
by the station's `disk_low` fault (edge_agent.disk_space) and the controller's disk warning."""

from __future__ import annotations

import math

MB = 1024 * 1024  # binary megabytes, as review.quota_mb and min_free_mb count them
GB = 1024 * MB
TB = 1024 * GB
MAX_FLOOR_MB = 10**9
"""The highest free-space floor a configuration takes (about 954 TB): above any disk, still a
number (a test sets it to see the warning on any machine)."""
HYSTERESIS = 0.10  # a low disk clears only with this fraction of the floor more than the floor


def clears_at(floor: int) -> int:
    """The free space at which a low disk stops being low: the floor plus 10 % of it."""
    return floor + math.ceil(floor * HYSTERESIS)


def is_low(free: int, floor: int, *, was_low: bool) -> bool:
    """Below the floor is low; a disk that was low stays low until it is back above the floor
    by 10 % of it, so a disk hovering at the floor does not warn and clear at every check. A
    floor of 0 turns the check off (and ends a warning raised before)."""
    if floor <= 0:
        return False
    return free < (clears_at(floor) if was_low else floor)


def size_text(size: int) -> str:
    """A size as `df -h` shows it, in units of 1024: 512 MB, 1.2 GB, 50 GB, 3 TB (the fleet
    dashboard's script formats the same way)."""
    value, unit = size / MB, "MB"
    for larger in ("GB", "TB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
    return f"{text.removesuffix('.0')} {unit}"
