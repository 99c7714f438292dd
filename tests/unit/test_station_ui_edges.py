"""Edge cases of the station UI's pure helpers: shifts across a daylight-saving change."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from station_ui.views import shift_start

pytestmark = pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is Europe/Berlin (CET in winter, CEST in summer)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("now", "started"),
    [
        # Autumn: the clocks go back at 03:00 CEST. At 04:00 CET the night shift began at
        # 22:00 CEST the evening before, which is 20:00 UTC.
        (datetime(2026, 10, 25, 3, 0, tzinfo=UTC), datetime(2026, 10, 24, 20, 0, tzinfo=UTC)),
        # Spring: the clocks go forward at 02:00 CET. At 05:00 CEST the night shift began at
        # 22:00 CET, which is 21:00 UTC.
        (datetime(2026, 3, 29, 3, 0, tzinfo=UTC), datetime(2026, 3, 28, 21, 0, tzinfo=UTC)),
        # The first shift after the change starts at 06:00 on the new clock.
        (datetime(2026, 10, 25, 6, 0, tzinfo=UTC), datetime(2026, 10, 25, 5, 0, tzinfo=UTC)),
        (datetime(2026, 3, 29, 5, 0, tzinfo=UTC), datetime(2026, 3, 29, 4, 0, tzinfo=UTC)),
    ],
)
def test_shifts_start_on_the_wall_clock_across_a_daylight_saving_change(
    berlin: None, now: datetime, started: datetime
) -> None:
    for given in (now, now.astimezone()):
        assert shift_start(given, 6, 8) == started
        assert shift_start(given, 6, 8).astimezone().hour in (6, 14, 22)
