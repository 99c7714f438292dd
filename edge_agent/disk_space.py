"""Free space on the file system of the station's data dir: when it counts as low, and how the
`disk_low` fault says so. Pure logic; the agent's housekeeping measures and raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from linesight.disk_space import MB, clears_at, size_text

CHECK_EVERY_S = 15.0  # how often housekeeping measures the free space


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """What `shutil.disk_usage` says of the data dir's file system, in bytes."""

    free: int
    total: int


def floor_bytes(min_free_mb: float) -> int:
    return int(min_free_mb * MB)


def _as_configured(min_free_mb: float) -> str:
    return str(int(min_free_mb)) if float(min_free_mb).is_integer() else f"{min_free_mb:g}"


def low_message(data_dir: Path, space: DiskSpace, min_free_mb: float) -> str:
    floor = floor_bytes(min_free_mb)
    return (
        f"only {size_text(space.free)} free of {size_text(space.total)} on the file system of "
        f"{data_dir}, below the {size_text(floor)} floor "
        f"(storage.min_free_mb: {_as_configured(min_free_mb)}); the fault clears above "
        f"{size_text(clears_at(floor))}. Free some space before the station can no longer "
        f"store decisions"
    )
