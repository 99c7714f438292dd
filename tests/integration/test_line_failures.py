"""A whole line (real agents, a real controller, a real mosquitto) through the failures a plant
lives with: the broker killed mid-stage, the controller replaced mid-rollout, an operator's
verdict given while no controller runs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.client import ControllerClient
from deploy.rollout import StageStep
from linesight.artifacts import sha256_file
from linesight.broker import Broker
from tests.support import DEMO_PUB, V1, V21, AgentLine, served_controller, wait_for

STATIONS = ("st-1", "st-2")
# A long shadow stage on st-1: the rollout stays observing while the line lives through a fault.
SHADOW_THEN_PROMOTE = """
name: line-failures
command_timeout_s: 30
command_retry_s: 2
stages:
  - name: shadow on st-1
    stations: [st-1]
    mode: shadow
    exit: {{min_parts: {min_parts}, min_labelled_disagreements: 10, max_duration_s: 240}}
    gate: {{min_labels: 10}}
    on_inconclusive: rollback
  - name: promote everywhere
    stations: all
    mode: promote
"""


@pytest.fixture
def line(tmp_path: Path, broker: Broker) -> Iterator[AgentLine]:
    running = AgentLine(broker.url, tmp_path, STATIONS, rate=40.0)
    yield running
    running.stop()


def finished(client: ControllerClient) -> bool:
    doc = client.current()
    return doc is not None and doc["phase"] in ("promoted", "rolled_back", "aborted")


def fleet_db(root: Path) -> sqlite3.Connection:
    """A read-only connection of the test's own to the controller's store."""
    return sqlite3.connect(f"file:{root / 'fleet' / 'fleet.db'}?mode=ro", uri=True, timeout=10)


def stored_upto(root: Path, station: str) -> int:
    """The highest seq of `station`'s `stream` below which every seq is stored."""
    with fleet_db(root) as db:
        seqs = {row[0] for row in db.execute(
            "SELECT seq FROM messages WHERE station = ?", (station,))}
    upto = -1
    while upto + 1 in seqs:
        upto += 1
    return upto


def no_double_counts(root: Path) -> None:
    """Each message is stored once (msg_id), each part's decision and shadow result once."""
    with fleet_db(root) as db:
        twice = db.execute(
            "SELECT msg_id, count(*) FROM messages GROUP BY msg_id HAVING count(*) > 1"
        ).fetchall()
        assert not twice, f"messages stored twice: {twice[:5]}"
        for table in ("decisions", "shadows"):
            twice = db.execute(
                f"SELECT station, part_id, count(*) FROM {table} "  # noqa: S608 - fixed names
                "GROUP BY station, part_id HAVING count(*) > 1"
            ).fetchall()
            assert not twice, f"parts counted twice in {table}: {twice[:5]}"


def test_a_broker_killed_mid_stage_loses_and_doubles_nothing(
    line: AgentLine, broker: Broker, tmp_path: Path
) -> None:
    with served_controller(tmp_path, broker.url) as (ctl, client):
        line.start()
        wait_for(lambda: len(ctl.fleet()) == 2 and all(v.online for v in ctl.fleet().values()),
                 30, "two stations online")
        client.start_rollout(SHADOW_THEN_PROMOTE.format(min_parts=100_000),
                             "part-classifier", "2.0.0")
        wait_for(lambda: ctl.rollout is not None
                 and ctl.rollout.record.step == StageStep.OBSERVING, 30,
                 "the shadow stage to observe")
        first = line.agents["st-1"]
        wait_for(lambda: stored_upto(tmp_path, "st-1") > 50, 30, "shadow results stored")

        broker.kill()  # a power cut: only what autosave wrote survives
        # The stations keep inspecting: their records pile up in the outboxes.
        made_during = {s: a.store.last_seq() for s, a in line.agents.items()}
        wait_for(lambda: all(a.store.last_seq() > made_during[s] + 40
                             for s, a in line.agents.items()), 30, "parts made in the outage")
        made = {s: a.store.last_seq() for s, a in line.agents.items()}
        broker._fixed_port = True  # come back where every client looks for it
        broker.start()

        def all_stored() -> bool:
            return all(stored_upto(tmp_path, s) >= n for s, n in made.items())

        wait_for(all_stored, 60, f"every record made up to {made} stored")
        no_double_counts(tmp_path)
        # The rollout carried on through the outage, still in its first stage.
        doc = client.current()
        assert doc is not None and doc["phase"] == "running" and doc["stage"] == 0, doc
        assert first.slots.candidate is not None
        # The gate's evidence is what the stored shadow results say, once each.
        with fleet_db(tmp_path) as db:
            results = db.execute(
                "SELECT count(*), count(DISTINCT part_id) FROM shadows WHERE station = 'st-1'"
            ).fetchone()
        assert results[0] == results[1] > 0


def test_a_controller_replaced_mid_stage_rolls_a_regressed_model_back_everywhere(
    line: AgentLine, broker: Broker, tmp_path: Path
) -> None:
    with served_controller(tmp_path, broker.url) as (ctl, client):
        line.start()
        wait_for(lambda: len(ctl.fleet()) == 2, 30, "two stations")
        started = client.start_rollout(SHADOW_THEN_PROMOTE.format(min_parts=150),
                                       "part-classifier", "2.1.0")
        wait_for(lambda: line.agents["st-1"].slots.candidate is not None, 30,
                 "the candidate on st-1")
    # The first controller is gone mid-stage; a new one on the same data dir takes over.
    with served_controller(tmp_path, broker.url) as (ctl, client):
        doc = client.current()
        assert doc is not None and doc["rollout_id"] == started["rollout_id"]
        assert doc["phase"] == "running", doc
        wait_for(lambda: finished(client), 80, "the resumed rollout to end")
        doc = client.current()
        assert doc is not None and doc["phase"] == "rolled_back", doc
        assert doc["touched"] == ["st-1"]
        wait_for(lambda: all(a.slots.candidate is None for a in line.agents.values()), 20,
                 "no candidate left")
        assert all(a.slots.active.ref.version == "1.0.0" for a in line.agents.values())
        # What the stations report (the controller's inventory) names the old active model.
        v1 = sha256_file(V1 / "manifest.json")
        v21 = sha256_file(V21 / "manifest.json")
        wait_for(lambda: all(v.active_sha256 == v1 and v.candidate_sha256 is None
                             for v in ctl.fleet().values()), 20, "the stations' state")
        assert v21 not in {v.active_sha256 for v in ctl.fleet().values()}


def test_a_verdict_given_while_the_controller_is_down_reaches_it(
    tmp_path: Path, broker: Broker
) -> None:
    line = AgentLine(broker.url, tmp_path, ("st-1",), rate=40.0, operated=())
    try:
        with served_controller(tmp_path, broker.url) as (ctl, _client):
            line.start()
            wait_for(lambda: len(ctl.fleet()) == 1, 30, "the station")
        store = line.agents["st-1"].store
        wait_for(lambda: bool(store.pending_reviews(limit=1)), 30, "a part to review")
        part = store.pending_reviews(limit=1)[0].part_id
        assert store.record_verdict(part, "op-7", "reject", "defect", datetime.now(UTC))
        with served_controller(tmp_path, broker.url):
            def arrived() -> bool:
                with fleet_db(tmp_path) as db:
                    return db.execute(
                        "SELECT operator, outcome FROM verdicts WHERE part_id = ?", (part,)
                    ).fetchall() == [("op-7", "reject")]

            wait_for(arrived, 30, "the verdict in the controller's store")
    finally:
        line.stop()


def station_process(root: Path, broker: Broker, station: str) -> subprocess.Popen[bytes]:
    """A station as the plant runs it: the agent command in its own process."""
    with (root / f"{station}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "agent", "--station", station,
             "--broker", broker.url, "--source", "synthetic:seed=31,rate=40",
             "--active", str(V1), "--automation", "partial",
             "--data-dir", str(root / station), "--key", str(DEMO_PUB)],
            stdout=subprocess.DEVNULL, stderr=log,
        )


def stop_station(station: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as systemd stops it; killed if it has not stopped within 30 s."""
    station.send_signal(signal.SIGTERM)
    try:
        station.wait(30)
    except subprocess.TimeoutExpired:
        station.kill()
        station.wait(10)


@pytest.mark.parametrize("when", ["deploying", "observing"])
def test_a_station_killed_during_a_rollout_comes_back_consistent(
    tmp_path: Path, broker: Broker, when: str
) -> None:
    v1 = sha256_file(V1 / "manifest.json")
    v21 = sha256_file(V21 / "manifest.json")
    station = station_process(tmp_path, broker, "st-1")
    try:
        with served_controller(tmp_path, broker.url) as (ctl, client):
            wait_for(lambda: "st-1" in ctl.fleet() and ctl.fleet()["st-1"].online, 30,
                     "the station online")
            client.start_rollout(SHADOW_THEN_PROMOTE.format(min_parts=100_000),
                                 "part-classifier", "2.1.0")
            if when == "observing":
                wait_for(lambda: ctl.fleet()["st-1"].candidate_sha256 == v21, 30,
                         "the candidate reported by st-1")
            os.kill(station.pid, signal.SIGKILL)  # a power cut on the station
            station.wait(10)
            wait_for(lambda: not ctl.fleet()["st-1"].online, 30, "st-1 offline")
            station = station_process(tmp_path, broker, "st-1")
            wait_for(lambda: finished(client), 80, "the rollout to end")
            doc = client.current()
            assert doc is not None
            if doc["phase"] == "rolled_back":
                # Whatever the station held when it died, it holds the old model alone now.
                wait_for(lambda: ctl.fleet()["st-1"].online
                         and ctl.fleet()["st-1"].active_sha256 == v1
                         and ctl.fleet()["st-1"].candidate_sha256 is None, 30,
                         "st-1 back on 1.0.0 without a candidate")
                assert not doc.get("rollbacks_owed"), doc
            else:
                pytest.fail(f"a regressed candidate ended {doc['phase']}: {doc}")
    finally:
        stop_station(station)


def test_a_rollback_owed_to_a_dead_station_survives_a_controller_restart(
    tmp_path: Path, broker: Broker
) -> None:
    """The station dies holding the candidate, its rollback times out and expires, the
    controller is replaced; when the station comes back it still loses the candidate."""
    v1 = sha256_file(V1 / "manifest.json")
    v21 = sha256_file(V21 / "manifest.json")
    plan = SHADOW_THEN_PROMOTE.format(min_parts=100_000).replace(
        "command_timeout_s: 30", "command_timeout_s: 3")
    station = station_process(tmp_path, broker, "st-1")
    try:
        with served_controller(tmp_path, broker.url, command_ttl_s=4) as (ctl, client):
            wait_for(lambda: "st-1" in ctl.fleet() and ctl.fleet()["st-1"].online, 30,
                     "the station online")
            client.start_rollout(plan, "part-classifier", "2.1.0")
            wait_for(lambda: ctl.fleet()["st-1"].candidate_sha256 == v21, 30,
                     "the candidate reported by st-1")
            os.kill(station.pid, signal.SIGKILL)
            station.wait(10)
            wait_for(lambda: finished(client), 30, "the rollout to end without st-1")
            doc = client.current()
            assert doc is not None and doc["phase"] == "rolled_back", doc
            assert doc["rollbacks_owed"] == ["st-1"], doc
            owed_at = datetime.now(UTC)
        # Every copy of the rollback sent so far expires while no controller runs.
        wait_for(lambda: (datetime.now(UTC) - owed_at).total_seconds() > 5, 10, "expiry")
        with served_controller(tmp_path, broker.url, command_ttl_s=4) as (ctl, client):
            station = station_process(tmp_path, broker, "st-1")
            wait_for(lambda: ctl.fleet()["st-1"].online
                     and ctl.fleet()["st-1"].candidate_sha256 is None
                     and ctl.fleet()["st-1"].active_sha256 == v1, 30,
                     "st-1 back on 1.0.0 without the candidate")
            wait_for(lambda: not (client.current() or {}).get("rollbacks_owed"), 30,
                     "the owed rollback settled")
    finally:
        stop_station(station)
