"""The bundle folders a station keeps on its disk over many rollouts: every deploy downloads a
bundle into `data_dir/bundles/`, and a folder no slot (running or saved) needs any more is
removed, never one a slot still needs. Real signed bundles served over HTTP, loaded with
onnxruntime; the stations are not connected."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from linesight import protocol as p
from linesight.artifacts import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    load_private_key,
    parse_manifest,
    sha256_file,
    write_signed_manifest,
)
from tests.support import DEMO_KEY, V1, V2, command, file_server, unstarted_agent

STATION = "press-11"
VERSIONS = ("2.0.1", "2.0.2", "2.0.3", "2.0.4", "2.0.5")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A bundle server holding 2.0.1 ... 2.0.5: the shipped 2.0.0 under new versions, each
    signed with the demo key, so every release is a bundle (and a folder) of its own."""
    root = tmp_path_factory.mktemp("served")
    key = load_private_key(DEMO_KEY)
    for version in VERSIONS:
        folder = root / "part-classifier" / version
        shutil.copytree(V2, folder)
        manifest = parse_manifest((folder / MANIFEST_FILE).read_bytes())
        write_signed_manifest(folder, manifest.model_copy(update={"version": version}), key)
    with file_server(root) as base:
        yield base, root


def deploy(served: tuple[str, Path], version: str) -> p.DeployCandidate:
    base, root = served
    folder = root / "part-classifier" / version
    return p.DeployCandidate(
        url=f"{base}/part-classifier/{version}/",
        model=p.ModelRef(name="part-classifier", version=version,
                         sha256=sha256_file(folder / MANIFEST_FILE)),
        signature=(folder / SIGNATURE_FILE).read_text().strip(),
        mode=p.DeploymentMode.SHADOW,
    )


def station(data_dir: Path, **overrides: Any) -> contextlib.AbstractContextManager[Agent]:
    return unstarted_agent(data_dir, STATION, **overrides)


def order(agent: Agent, body: p.CommandBody) -> p.CommandAck:
    ack = agent.handle_command(command(STATION, body).to_json())
    assert ack is not None and ack.ok, ack and ack.error
    return ack


def kept(data_dir: Path) -> list[str]:
    """The bundle folders on disk, as `<name>/<folder>`."""
    root = data_dir / "bundles"
    return sorted(f"{d.parent.name}/{d.name}" for d in root.glob("*/*")) if root.exists() else []


def folder_of(agent: Agent, slot: str) -> str:
    model = getattr(agent.slots, slot)
    assert model is not None, f"no {slot} model"
    return f"{model.bundle.parent.name}/{model.bundle.name}"


def versions(agent: Agent) -> tuple[str, str | None, str | None]:
    slots = agent.slots
    return (slots.active.ref.version, slots.candidate.ref.version if slots.candidate else None,
            slots.previous.ref.version if slots.previous else None)


def test_many_rollouts_keep_only_the_bundles_the_slots_need(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    """Five releases rolled out one after the other: the disk holds the active model and the
    one kept for rollback, not every bundle the station ever downloaded."""
    data = tmp_path / "station"
    with station(data) as agent:
        for version in VERSIONS:
            order(agent, deploy(served, version))
            order(agent, p.Promote())
        assert versions(agent) == ("2.0.5", None, "2.0.4")
        assert kept(data) == sorted([folder_of(agent, "active"), folder_of(agent, "previous")])
    with station(data) as agent:  # what is kept is what a restart needs, all of it
        assert versions(agent) == ("2.0.5", None, "2.0.4")
        assert agent.faults == {}
        order(agent, p.Rollback())
        assert versions(agent) == ("2.0.4", None, None)
        assert kept(data) == [folder_of(agent, "active")], "the undone 2.0.5 is removed"


def test_a_rolled_back_candidate_is_removed_and_the_rollback_target_kept(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    data = tmp_path / "station"
    with station(data) as agent:
        order(agent, deploy(served, "2.0.1"))
        order(agent, p.Promote())
        order(agent, deploy(served, "2.0.2"))
        assert versions(agent) == ("2.0.1", "2.0.2", "1.0.0")
        trial = folder_of(agent, "candidate")
        assert trial in kept(data)
        order(agent, p.Rollback())  # the candidate leaves its slot
        assert versions(agent) == ("2.0.1", None, "1.0.0")
        assert kept(data) == [folder_of(agent, "active")]
        order(agent, p.Rollback())  # back to the configured 1.0.0, which is not in bundles/
        assert versions(agent) == ("1.0.0", None, None)
        assert kept(data) == []
        assert V1.is_dir() and (V1 / MODEL_FILE).is_file(), "a configured bundle is never touched"


def test_a_refused_deploy_leaves_no_bundle_behind(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    """A bundle downloaded for a deploy that is then refused (not newer than the active model)
    is needed by no slot."""
    data = tmp_path / "station"
    with station(data) as agent:
        order(agent, deploy(served, "2.0.3"))
        order(agent, p.Promote())
        ack = agent.handle_command(command(STATION, deploy(served, "2.0.2")).to_json())
        assert ack is not None and not ack.ok and "not newer" in (ack.error or "")
        assert kept(data) == [folder_of(agent, "active")]


def test_a_bundle_the_saved_slots_still_name_is_kept_while_their_save_fails(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    """A change the store cannot save yet is undone by a restart: the bundles the saved slots
    name must still be there for it."""
    data = tmp_path / "station"
    with station(data) as agent:
        order(agent, deploy(served, "2.0.1"))
        order(agent, p.Promote())
        order(agent, deploy(served, "2.0.2"))
        saved_candidate = folder_of(agent, "candidate")
        refuse_slot_saves(data / "station.db")
        unanswered = agent.handle_command(command(STATION, p.Rollback()).to_json())
        assert unanswered is None, "carried out, not acknowledged until saved"
        assert "slots_save" in agent.faults
        assert saved_candidate in kept(data)
    with station(data) as agent:  # the restart the save never reached
        assert versions(agent) == ("2.0.1", "2.0.2", "1.0.0")
        assert "candidate_load" not in agent.faults


def refuse_slot_saves(db: Path) -> None:
    """Make the station's SQLite file refuse every write of the model slots, as a full disk."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        for event in ("INSERT", "UPDATE"):
            conn.execute(
                f"CREATE TRIGGER refuse_slots_{event.lower()} BEFORE {event} ON documents "
                "WHEN NEW.name = 'slots' BEGIN SELECT RAISE(ABORT, 'database or disk is full'); "
                "END"
            )
        conn.commit()
    finally:
        conn.close()


def test_leftovers_of_a_crash_are_removed_when_the_station_starts(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    """A crash between a bundle's download and the save of the slot that names it leaves a
    folder no slot needs; one mid-download leaves a staging folder. Both go at the next start,
    and what the saved slots name stays."""
    data = tmp_path / "station"
    with station(data) as agent:
        order(agent, deploy(served, "2.0.1"))
        needed = folder_of(agent, "candidate")
    orphan = data / "bundles" / "part-classifier" / "2.0.9-0123456789ab"
    shutil.copytree(V2, orphan)
    staging = data / ".staging-k1ll3d"
    staging.mkdir()
    (staging / MODEL_FILE).write_bytes(b"\0" * 65536)
    by_hand = data / "bundles" / "part-classifier" / "0.9.0"  # as docs/deploy.md suggests
    shutil.copytree(V1, by_hand)
    with station(data) as agent:
        assert versions(agent) == ("1.0.0", "2.0.1", None)
        assert kept(data) == sorted([needed, "part-classifier/0.9.0"])
        assert not staging.exists(), "the staging folder a crash left is removed at start"
        assert (by_hand / MODEL_FILE).is_file(), "a bundle the plant put there is never removed"


def test_a_damaged_promoted_bundle_at_restart_holds_every_part_and_is_not_rolled_back_to(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    """After 1.0.0 -> 2.0.1 -> 2.0.2, the disk loses 2.0.2's model file (bit rot) and the
    configured bundle is gone too: the station restarts on the fail-safe, holding every part
    for review, with the intact 2.0.1 still there to roll back to."""
    data = tmp_path / "station"
    configured = tmp_path / "configured"
    shutil.copytree(V1, configured)
    with station(data, active=configured) as agent:
        order(agent, deploy(served, "2.0.1"))
        order(agent, p.Promote())
        order(agent, deploy(served, "2.0.2"))
        order(agent, p.Promote())
        active, previous = agent.slots.active.bundle, agent.slots.previous
        assert previous is not None
    (active / MODEL_FILE).write_bytes(b"bit rot")
    shutil.rmtree(configured)
    with station(data, active=configured, automation="full") as agent:
        assert agent.slots.active.ref.name == "unloaded" and "active_load" in agent.faults
        for _ in range(5):
            frame = agent.source.read(timeout=5)
            assert frame is not None
            part = agent.inspect(frame)
            assert (part.action, part.decided_by) == (p.Action.REVIEW, p.DecidedBy.FAILSAFE)
        assert versions(agent)[2] == "2.0.1", "the intact rollback target is still there"
        assert active.is_dir() and previous.bundle.is_dir()
