"""The controller's low-disk warning: the floor in its configuration, the status kept between
measurements, sizes as the warning writes them, and the controller measuring its real `data_dir`
(built, never started: no broker, no threads). When free space counts as low is
linesight.disk_space's rule, tested in test_disk_space.py."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.config import MAX_MIN_FREE_MB, load_controller_config
from deploy.controller import Controller, DiskStatus, next_disk_status
from linesight.broker import free_port
from linesight.config_file import ConfigError
from linesight.disk_space import MB, size_text

GB = 1024 * MB
FLOOR = 2 * GB


def test_the_next_status_keeps_the_last_measurement_when_one_fails() -> None:
    first = next_disk_status(DiskStatus(), (GB, 50 * GB), FLOOR)
    assert first == DiskStatus(free_bytes=GB, total_bytes=50 * GB, low=True)
    failed = next_disk_status(first, OSError(5, "Input/output error"), FLOOR)
    assert (failed.free_bytes, failed.total_bytes, failed.low) == (GB, 50 * GB, True)
    assert failed.error is not None and "Input/output error" in failed.error
    recovered = next_disk_status(failed, (10 * GB, 50 * GB), FLOOR)
    assert recovered == DiskStatus(free_bytes=10 * GB, total_bytes=50 * GB, low=False)


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 MB"),
    (512 * MB, "512 MB"),
    (FLOOR, "2 GB"),
    (int(1.2 * GB), "1.2 GB"),
    (50 * GB, "50 GB"),
    (int(9.96 * GB), "10 GB"),
    (3 * 1024 * GB, "3 TB"),
    (MAX_MIN_FREE_MB * MB, "954 TB"),
])
def test_sizes_read_as_df_h_shows_them(size: int, text: str) -> None:
    assert size_text(size) == text


# --- the configuration ---------------------------------------------------------------------------


def _config(tmp_path: Path, **settings: object) -> dict[str, object]:
    return {"broker.url": f"mqtt://127.0.0.1:{free_port()}", "data_dir": tmp_path / "fleet",
            "bundles": tmp_path, **settings}


def test_the_floor_defaults_to_2048_mb_and_takes_0_to_turn_the_check_off(tmp_path: Path) -> None:
    assert load_controller_config(None, _config(tmp_path)).min_free_mb == 2048
    assert load_controller_config(None, _config(tmp_path, min_free_mb=0)).min_free_mb == 0
    assert load_controller_config(
        None, _config(tmp_path, min_free_mb=MAX_MIN_FREE_MB)).min_free_mb == MAX_MIN_FREE_MB


@pytest.mark.parametrize(("value", "problem"), [
    (-1, "greater than or equal to 0"),
    (MAX_MIN_FREE_MB + 1, "less than or equal to"),
    (float("inf"), "finite number"),
    (float("nan"), "finite number"),
    (1.5, "valid integer"),
    ("lots", "valid integer"),
])
def test_a_bad_floor_is_refused_with_its_key_named(
    tmp_path: Path, value: object, problem: str
) -> None:
    with pytest.raises(ConfigError, match=rf"min_free_mb: .*{problem}"):
        load_controller_config(None, _config(tmp_path, min_free_mb=value))


@pytest.mark.parametrize("key", ["retention_days", "offline_after_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_no_key_of_the_controller_takes_infinity_or_nan(
    tmp_path: Path, key: str, value: float
) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: "):
        load_controller_config(None, _config(tmp_path, **{key: value}))


def test_a_retention_past_a_hundred_years_is_refused_and_one_of_a_hundred_prunes(
    tmp_path: Path,
) -> None:
    """10^8 days made the hourly prune fail (a date before year 1); 36,500 days is the bound,
    as for the station's history."""
    with pytest.raises(ConfigError, match=r"retention_days: .*less than or equal to 36500"):
        load_controller_config(None, _config(tmp_path, retention_days=1e8))
    built = Controller(load_controller_config(None, _config(tmp_path, retention_days=36_500)))
    try:
        assert built.prune() == 0
    finally:
        built.store.close()


# --- the controller on the real disk -------------------------------------------------------------


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    built = Controller(load_controller_config(None, _config(tmp_path)))
    yield built
    built.store.close()


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "deploy.controller"]


def test_a_floor_above_the_free_space_warns_once_and_an_info_says_when_it_ends(
    controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy.controller")
    controller.config.min_free_mb = MAX_MIN_FREE_MB  # far above any disk this runs on
    controller.check_disk()
    controller.check_disk()
    status = controller.disk
    usage = shutil.disk_usage(controller.config.data_dir)
    assert status.low and status.error is None
    assert status.total_bytes == usage.total
    assert status.free_bytes is not None and abs(status.free_bytes - usage.free) < GB
    [(level, message)] = _records(caplog)
    assert level == logging.WARNING
    assert "below the 954 TB floor" in message and "retention_days" in message

    caplog.clear()
    controller.config.min_free_mb = 1
    controller.check_disk()
    controller.check_disk()
    assert not controller.disk.low
    [(level, message)] = _records(caplog)
    assert level == logging.INFO and "no longer low" in message


def test_a_floor_of_zero_measures_nothing(
    controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy.controller")
    controller.config.min_free_mb = 0
    controller.check_disk()
    assert controller.disk == DiskStatus()
    assert _records(caplog) == []


def test_a_data_dir_that_cannot_be_measured_is_logged_once(
    controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy.controller")
    controller.check_disk()
    measured = controller.disk
    assert measured.free_bytes is not None and not measured.low
    shutil.rmtree(controller.config.data_dir)  # the open database stays usable, unlinked
    controller.check_disk()
    controller.check_disk()
    assert controller.disk.error is not None and "No such file" in controller.disk.error
    assert controller.disk.free_bytes == measured.free_bytes
    [(level, message)] = _records(caplog)
    assert level == logging.WARNING and "cannot measure" in message

    caplog.clear()
    controller.config.data_dir.mkdir()
    controller.check_disk()
    assert controller.disk.error is None
    [(level, message)] = _records(caplog)
    assert level == logging.INFO and "measured again" in message


def test_health_and_metrics_say_nothing_of_a_disk_never_measured(
    controller: Controller,
) -> None:
    app = create_app(controller).test_client()
    disk = app.get("/api/health").get_json()["disk"]
    assert disk == {"free_bytes": None, "total_bytes": None, "min_free_bytes": 2048 * MB,
                    "low": False, "error": None}
    assert "linesight_fleet_disk_free_bytes" not in app.get("/metrics").get_data(as_text=True)
