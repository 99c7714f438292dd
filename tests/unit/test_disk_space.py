"""When a station's disk counts as low (with hysteresis so the fault does not flap), how it says
so, and the `storage.min_free_mb` key that sets the floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import MAX_MIN_FREE_MB, AgentConfig, StorageConfig
from edge_agent.disk_space import DiskSpace, floor_bytes, low_message
from linesight.config_file import ConfigError
from linesight.disk_space import MB, clears_at, is_low
from tests.support import V1, station_config

GB = 1024 * MB


def test_a_disk_below_the_floor_is_low_and_one_at_or_above_it_is_not() -> None:
    floor = 1024 * MB
    assert is_low(floor - 1, floor, was_low=False)
    assert not is_low(floor, floor, was_low=False)
    assert not is_low(50 * GB, floor, was_low=False)
    assert is_low(0, floor, was_low=False)


def test_a_low_disk_stays_low_until_it_has_ten_percent_of_the_floor_more() -> None:
    floor = 1000 * MB
    assert clears_at(floor) == 1100 * MB
    assert is_low(floor + 1, floor, was_low=True), "just above the floor: still low"
    assert is_low(1100 * MB - 1, floor, was_low=True)
    assert not is_low(1100 * MB, floor, was_low=True)
    # ... while a disk that was not low is not low anywhere in that band.
    assert not is_low(floor + 1, floor, was_low=False)


def test_a_disk_hovering_at_the_floor_raises_once_and_clears_once() -> None:
    floor = 1000 * MB
    low = False
    changes = 0
    for free in [1001, 999, 1001, 998, 1050, 1099, 1000, 1100, 1099, 1001, 999]:
        now_low = is_low(free * MB, floor, was_low=low)
        changes += now_low != low
        low = now_low
    assert changes == 3, "raised at 999, cleared at 1100, raised again at 999"
    assert low


def test_a_floor_of_zero_turns_the_check_off() -> None:
    assert not is_low(0, 0, was_low=False)
    assert not is_low(0, 0, was_low=True), "a fault raised before the floor went to 0 clears"
    assert clears_at(0) == 0


def test_the_message_names_the_data_dir_the_free_and_total_space_and_the_floor() -> None:
    message = low_message(Path("/var/lib/linesight"), DiskSpace(free=812 * MB, total=50 * GB),
                          min_free_mb=1024)
    assert message == (
        "only 812 MB free of 50 GB on the file system of /var/lib/linesight, below the "
        "1 GB floor (storage.min_free_mb: 1024); the fault clears above 1.1 GB. Free some "
        "space before the station can no longer store decisions"
    )


@pytest.mark.parametrize(("min_free_mb", "shown"), [
    (0.5, "0.5 MB floor (storage.min_free_mb: 0.5)"),
    (10**9, "954 TB floor (storage.min_free_mb: 1000000000)"),
])
def test_the_floor_is_shown_as_configured(min_free_mb: float, shown: str) -> None:
    message = low_message(Path("/d"), DiskSpace(free=0, total=GB), min_free_mb=min_free_mb)
    assert shown in message


def test_the_floor_in_bytes() -> None:
    assert floor_bytes(1024) == GB
    assert floor_bytes(0.5) == MB // 2
    assert floor_bytes(0) == 0


def test_the_floor_defaults_to_a_gigabyte_and_can_be_set_or_turned_off(tmp_path: Path) -> None:
    assert StorageConfig().min_free_mb == 1024
    assert station_config(tmp_path, "mqtt://127.0.0.1:1").storage.min_free_mb == 1024
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", storage__min_free_mb=0)
    assert config.storage.min_free_mb == 0
    config = station_config(tmp_path, "mqtt://127.0.0.1:1", storage__min_free_mb=MAX_MIN_FREE_MB)
    assert config.storage.min_free_mb == MAX_MIN_FREE_MB == 10**9


def test_the_floor_is_read_from_the_station_yaml(tmp_path: Path) -> None:
    document = {"station": "press-01", "broker": {"url": "mqtt://h:1883", "client_id": "c"},
                "source": "synthetic:", "active": str(V1), "data_dir": str(tmp_path),
                "storage": {"min_free_mb": 4096}}
    assert AgentConfig.model_validate(document).storage.min_free_mb == 4096


@pytest.mark.parametrize(("value", "reason"), [
    (-1, "greater than or equal to 0"),
    (MAX_MIN_FREE_MB + 1, "less than or equal to 1000000000"),
    (float("inf"), "finite number"),
    (float("nan"), "finite number"),
    ("lots", "valid number"),
])
def test_a_bad_floor_stops_start_up_naming_the_key(
    tmp_path: Path, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        station_config(tmp_path, "mqtt://127.0.0.1:1", storage__min_free_mb=value)
    assert "storage.min_free_mb" in str(caught.value)
    assert reason in str(caught.value)


def test_an_unknown_storage_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="storage.min_free_gb"):
        station_config(tmp_path, "mqtt://127.0.0.1:1", storage__min_free_gb=1)
