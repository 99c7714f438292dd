"""A station that comes back running another model than a rollout promoted on it (its data dir
restored from a backup) is shown out of step, and `realign` puts it back on the promoted model.
Real mosquitto, a real controller serving the shipped bundles, a real agent."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy.client import ControllerClient, ControllerError
from edge_agent.agent import Agent
from linesight.broker import Broker
from tests.support import agent_running, served_controller, station_config, wait_for

STATION = "press-21"
PROMOTE = f"""
name: promote on {STATION}
promote_without_evidence: true
command_timeout_s: 30
command_retry_s: 3
stages:
  - name: promote
    stations: [{STATION}]
    mode: promote
"""


def station(client: ControllerClient) -> dict[str, Any]:
    return next(s for s in client.stations() if s["station"] == STATION)


def runs(client: ControllerClient, version: str) -> bool:
    state = station(client)["state"] or {}
    return state.get("online") is True and (state.get("active") or {}).get("version") == version


def promoted(client: ControllerClient) -> bool:
    doc = client.current()
    return doc is not None and doc["phase"] == "promoted"


def test_a_station_restored_to_an_older_model_is_shown_and_realigned(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    data, backup = tmp_path / STATION, tmp_path / "backup"
    config = station_config(data, broker.url, station=STATION,
                            source="synthetic:seed=5,rate=20", state_interval_s=1.0)
    with served_controller(tmp_path, broker.url) as (controller, client):
        assert Agent(station_config(data, broker.url, station=STATION, max_parts=5)).run() == 0
        shutil.copytree(data, backup)  # 1.0.0 active

        with agent_running(config):
            wait_for(lambda: runs(client, "1.0.0"), 30, "the station online on 1.0.0")
            first = client.start_rollout(PROMOTE, "part-classifier", "2.0.0")
            wait_for(lambda: promoted(client), 60, "the rollout to promote 2.0.0")
            wait_for(lambda: runs(client, "2.0.0"), 30, "the station's state to name 2.0.0")
            entry = station(client)
            assert entry["expected_active"]["version"] == "2.0.0"
            assert entry["out_of_step"] is False
            assert controller.check_alignment() == set()

        shutil.rmtree(data)
        shutil.copytree(backup, data)  # the station comes back with 1.0.0 active
        with agent_running(config):
            wait_for(lambda: station(client)["out_of_step"], 30, "the station out of step")
            assert runs(client, "1.0.0")
            with caplog.at_level(logging.WARNING, logger="deploy.controller"):
                assert controller.check_alignment() == {STATION}
                assert controller.check_alignment() == {STATION}
            warnings = [r.getMessage() for r in caplog.records
                        if r.levelno == logging.WARNING and "but rollout" in r.getMessage()]
            assert warnings == [
                f"station {STATION} runs part-classifier 1.0.0, but rollout "
                f"{first['rollout_id']} promoted part-classifier 2.0.0 there (restored from a "
                f"backup? replaced?): bring it back with 'linesight fleet realign {STATION}' "
                "or the dashboard"
            ], "logged once, not on every check"
            assert gauge(client) == 1.0
            listed = cli("stations", client)
            assert listed.returncode == 0, listed.stderr
            assert (f"OUT OF STEP: promoted part-classifier 2.0.0 (linesight fleet realign "
                    f"{STATION})") in listed.stdout

            realigned = cli("realign", client, "--all")  # the stations out of step
            assert realigned.returncode == 0, realigned.stderr
            assert f"plan realign {STATION}" in realigned.stdout
            realign = client.current()
            assert realign is not None and realign["rollout_id"] != first["rollout_id"]
            assert [s["mode"] for s in realign["stages"]] == ["promote"]
            # (A second request while it runs is refused: tests/unit/test_alignment.py. Here the
            # real station may promote before such a request arrives.)
            wait_for(lambda: promoted(client), 60, "the realign rollout to promote 2.0.0")
            wait_for(lambda: runs(client, "2.0.0"), 30, "the station back on 2.0.0")
            assert station(client)["out_of_step"] is False
            assert controller.check_alignment() == set()
            assert gauge(client) == 0.0
            with pytest.raises(ControllerError, match="409.*runs part-classifier 2.0.0 already"):
                client.realign([STATION])
            assert "OUT OF STEP" not in cli("stations", client).stdout
            assert cli("realign", client, "--all").stdout == "no station is out of step\n"


def cli(verb: str, client: ControllerClient, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linesight.cli", "fleet", verb, *args, "--controller",
         client.url], capture_output=True, text=True, timeout=60,
    )


def gauge(client: ControllerClient) -> float:
    """linesight_fleet_station_out_of_step for the station, from /metrics."""
    with urllib.request.urlopen(f"{client.url}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    line = next(line for line in text.splitlines()
                if line.startswith(f'linesight_fleet_station_out_of_step{{station="{STATION}"}}'))
    return float(line.rsplit(" ", 1)[1])
