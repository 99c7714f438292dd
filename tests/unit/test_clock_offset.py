"""A station's clock offset from the arrival of its messages: the lowest delay over the last
window or two, so a replayed backlog never counts, and an old estimate ages out."""

from __future__ import annotations

import math

import pytest

from deploy.clock_offset import ClockOffsets

pytestmark = pytest.mark.unit


def test_the_quickest_arrival_is_the_offset_and_a_replayed_backlog_does_not_count() -> None:
    offsets = ClockOffsets(window_s=60)
    for behind in (3 * 3600 + 0.4, 3 * 3600 + 900.0, 3 * 3600 + 0.2, 3 * 3600 + 45.0):
        offsets.observe("press-01", behind, now=1000.0)
    assert offsets.behind_s("press-01", now=1000.0) == pytest.approx(3 * 3600 + 0.2)
    assert offsets.behind_s("press-02", now=1000.0) is None


def test_a_clock_ahead_is_negative() -> None:
    offsets = ClockOffsets(window_s=60)
    offsets.observe("press-01", -725.3, now=10.0)
    offsets.observe("press-01", -724.9, now=11.0)
    assert offsets.behind_s("press-01", now=12.0) == pytest.approx(-725.3)


def test_an_estimate_lasts_one_window_more_then_follows_the_new_arrivals() -> None:
    offsets = ClockOffsets(window_s=60)
    offsets.observe("press-01", 7200.0, now=10.0)  # window 0
    assert offsets.behind_s("press-01", now=100.0) == 7200.0, "window 1: still shown"
    assert offsets.behind_s("press-01", now=130.0) is None, "window 2: nothing recent"
    offsets.observe("press-01", 0.3, now=130.0)  # the clock was set meanwhile
    assert offsets.behind_s("press-01", now=130.0) == pytest.approx(0.3)


def test_a_clock_set_right_shows_within_two_windows() -> None:
    offsets = ClockOffsets(window_s=60)
    offsets.observe("press-01", -3600.0, now=10.0)
    offsets.observe("press-01", 0.2, now=70.0)
    assert offsets.behind_s("press-01", now=70.0) == -3600.0, "the lower of the two windows"
    offsets.observe("press-01", 0.2, now=130.0)
    assert offsets.behind_s("press-01", now=130.0) == pytest.approx(0.2)


def test_nan_and_infinity_are_not_offsets_and_the_window_must_be_positive() -> None:
    offsets = ClockOffsets()
    offsets.observe("press-01", math.nan, now=1.0)
    offsets.observe("press-01", math.inf, now=1.0)
    assert offsets.behind_s("press-01", now=1.0) is None
    with pytest.raises(ValueError, match="window_s"):
        ClockOffsets(window_s=0)
