"""The station screen when its store is locked, broken or missing a part's image on disk."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask

from edge_agent.store import StationStore
from linesight.cli import main
from tests.unit.test_station_ui import (
    _HASHES,
    OPERATOR_PIN,
    SUPERVISOR_PIN,
    FakeClock,
    add_part,
    csrf_of,
    make_app,
    sign_in,
)

JSON = {"Accept": "application/json"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StationStore]:
    # A short busy timeout: a locked store shows itself in a fraction of a second.
    opened = StationStore(tmp_path / "data", busy_timeout_s=0.1)
    opened.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    opened.upsert_operator("sup-1", "Sam Supervisor", "supervisor", _HASHES[SUPERVISOR_PIN])
    yield opened
    opened.close()


@pytest.fixture
def app(store: StationStore) -> Flask:
    app = make_app(store, FakeClock())
    app.config["TESTING"] = False  # answer errors as the served screen does, not raise them
    return app


@contextmanager
def locked(store: StationStore) -> Iterator[None]:
    """Another writer holds the store past its busy timeout (the agent stuck, a stalled disk)."""
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_verdict_the_store_cannot_write_says_it_was_not_recorded(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-1")
    client = app.test_client()
    token = sign_in(client)
    form = {"csrf_token": token, "part_id": "P-1", "outcome": "pass"}
    with locked(store):
        answer = client.post("/verdict", data=form, headers=JSON)
        page = client.post("/verdict", data=form)
    assert answer.status_code == 503
    assert "Not recorded" in answer.get_json()["error"]
    assert "database is locked" in answer.get_json()["error"]
    assert page.status_code == 503 and "Not recorded" in page.get_data(as_text=True)
    # Nothing half-done: once the store answers again, the same tap records the verdict.
    row = store.review("P-1")
    assert row is not None and row.outcome is None
    assert client.post("/verdict", data=form, headers=JSON).get_json()["result"] == "recorded"


def test_a_sign_in_the_store_cannot_record_says_so(app: Flask, store: StationStore) -> None:
    client = app.test_client()
    token = csrf_of(client)
    with locked(store):
        response = client.post(
            "/login", data={"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": token}
        )
    assert response.status_code == 503
    assert "database is locked" in response.get_data(as_text=True)


def test_supervisor_requests_the_store_cannot_write_say_so(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-2")
    client = app.test_client()
    token = sign_in(client, "sup-1", SUPERVISOR_PIN)
    assert client.post(
        "/verdict", data={"csrf_token": token, "part_id": "P-2", "outcome": "escalate"}
    ).status_code == 302
    with locked(store):
        resolve = client.post(
            "/supervisor/resolve",
            data={"csrf_token": token, "part_id": "P-2", "outcome": "reject"},
        )
        change = client.post(
            "/supervisor/automation",
            data={"csrf_token": token, "level": "partial", "reason": "night shift"},
        )
    for response in (resolve, change):
        assert response.status_code == 503
        assert "Not recorded" in response.get_data(as_text=True)


def test_a_page_the_store_cannot_read_says_so(app: Flask, store: StationStore) -> None:
    client = app.test_client()
    sign_in(client)
    raw = sqlite3.connect(store.path)
    raw.execute("DROP TABLE reviews")  # a damaged store: its reads fail
    raw.commit()
    raw.close()
    for path in ("/", "/api/queue"):
        response = client.get(path, headers=JSON if path.startswith("/api") else {})
        assert response.status_code == 503, path
        assert "store" in response.get_data(as_text=True), path


# --- images missing from disk ------------------------------------------------------------------


def test_a_part_whose_image_is_gone_from_disk_says_so_instead_of_a_broken_image(
    app: Flask, store: StationStore
) -> None:
    add_part(store, "P-3")
    path = store.image_path("P-3")
    assert path is not None
    path.unlink()  # removed by hand, or a store restored without its images
    client = app.test_client()
    token = sign_in(client)
    for page in ("/", "/partial/current"):
        text = client.get(page).get_data(as_text=True)
        assert "/image?part=P-3" not in text and "No image kept" in text, page
    assert client.get("/image?part=P-3").status_code == 404
    # The part can still be judged.
    form = {"csrf_token": token, "part_id": "P-3", "outcome": "escalate"}
    assert client.post("/verdict", data=form, headers=JSON).get_json()["result"] == "recorded"
    supervisor = app.test_client()
    sign_in(supervisor, "sup-1", SUPERVISOR_PIN)
    text = supervisor.get("/supervisor").get_data(as_text=True)
    assert "P-3" in text and "/image?part=P-3" not in text and "No image kept" in text


# --- the commands on a store that cannot be opened ---------------------------------------------


@pytest.mark.parametrize("command", ["ui", "ui-operator"])
def test_a_damaged_store_is_named_not_a_traceback(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "station.db").write_bytes(b"not a database at all " * 300)
    if command == "ui":
        argv = ["ui", "--data-dir", str(data), "--port", "18999"]
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO("2468\n"))
        argv = ["ui-operator", "add", "--data-dir", str(data), "--badge", "B-1", "--name", "Lee"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "station.db" in err and "not a database" in err and "Traceback" not in err
