"""Geometry of the status page's small plots; a Jinja macro draws it as inline SVG.

Only numbers and our own labels leave here, and the template escapes them like any other text,
so no markup is ever built from strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    plot_height: int
    bars: tuple[Bar, ...]
    peak: int
    first_label: str
    last_label: str
    bucket_minutes: int


@dataclass(frozen=True, slots=True)
class Segment:
    x: float
    width: float
    css_class: str
    title: str


def throughput_chart(
    points: list[tuple[datetime, int]],
    *,
    max_bars: int = 48,
    width: int = 640,
    height: int = 170,
) -> BarChart | None:
    """Parts per bucket over the shift, buckets widened so at most `max_bars` bars are drawn."""
    if not points:
        return None
    per_bar = max(1, math.ceil(len(points) / max_bars))
    buckets: list[tuple[datetime, int]] = []
    for start in range(0, len(points), per_bar):
        chunk = points[start : start + per_bar]
        buckets.append((chunk[0][0], sum(count for _, count in chunk)))
    peak = max(count for _, count in buckets)
    plot_height = height - 24  # room under the bars for the two time labels
    slot = width / len(buckets)
    gap = min(2.0, slot * 0.2)
    bars = []
    for index, (start_at, count) in enumerate(buckets):
        bar_height = 0.0 if peak == 0 else (count / peak) * (plot_height - 4)
        bars.append(Bar(
            x=round(index * slot + gap / 2, 2),
            y=round(plot_height - bar_height, 2),
            width=round(max(slot - gap, 1.0), 2),
            height=round(bar_height, 2),
            title=f"{start_at.astimezone():%H:%M} — {count} parts",
        ))
    return BarChart(
        width=width,
        height=height,
        plot_height=plot_height,
        bars=tuple(bars),
        peak=peak,
        first_label=f"{buckets[0][0].astimezone():%H:%M}",
        last_label=f"{buckets[-1][0].astimezone():%H:%M}",
        bucket_minutes=per_bar,
    )


def share_bar(
    shares: list[tuple[str, int, str]], *, width: int = 640
) -> tuple[Segment, ...]:
    """One horizontal bar split by count: (title, count, css class) per share."""
    total = sum(count for _, count, _ in shares)
    if total <= 0:
        return ()
    segments = []
    x = 0.0
    for title, count, css_class in shares:
        if count <= 0:
            continue
        segment_width = width * count / total
        segments.append(Segment(
            x=round(x, 2),
            width=round(segment_width, 2),
            css_class=css_class,
            title=f"{title}: {count} ({count / total * 100:.0f} %)",
        ))
        x += segment_width
    return tuple(segments)


def rate_width(rate: float | None, *, width: int = 640) -> float:
    """Width of a 0..1 rate's bar; 0 when unknown."""
    if rate is None or not math.isfinite(rate):
        return 0.0
    return round(max(0.0, min(1.0, rate)) * width, 2)
