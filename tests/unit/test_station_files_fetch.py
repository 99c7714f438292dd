"""A fetched bundle is on the disk for good before the station names it in its saved slots and
acknowledges the deploy: a power cut in the seconds after the ack must not leave the slot
naming a folder whose files the kernel never wrote (an empty model.onnx, a missing manifest).

A power cut cannot be pulled in a test; what can be watched is every fsync the fetch makes, by
the path of the descriptor synced, with a real fetch from a real bundle server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.bundle_fetch import fetch_bundle
from linesight.artifacts import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, sha256_file
from linesight.protocol import ModelRef
from tests.support import V2, file_server


def test_a_fetched_bundle_is_synced_to_disk_before_it_is_handed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", watched_fsync)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    with file_server(V2.parent) as url:
        target = fetch_bundle(f"{url}/2.0.0/", model, (V2 / SIGNATURE_FILE).read_text(),
                              data_dir, key=None, timeout=10.0)
    names = {path.name for path in synced if path.parent.name.startswith(".staging-")}
    assert {MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE} <= names, (
        f"every file of the bundle is synced before it is moved into place: {synced}"
    )
    assert target.parent in synced, "the bundle's new name in bundles/<name>/ is synced"
    assert data_dir / "bundles" in synced and data_dir in synced, "and the new folders"
