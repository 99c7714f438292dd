"""Downloading a candidate bundle from a bundle server that breaks off or answers garbage: always
a BundleError naming the URL and the problem. The server is a real one on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import bundle_fetch
from edge_agent.bundle_fetch import download, fetch_bundle
from linesight.artifacts import MANIFEST_FILE, SIGNATURE_FILE, BundleError, sha256_file
from linesight.protocol import ModelRef
from tests.support import V2, file_server, http_server
from tests.unit.test_artifacts import make_bundle


class BrokenBundleServer(BaseHTTPRequestHandler):
    """Serves the shipped 2.0.0 bundle under /good/; /bad-status, /cut-chunked and /cut-length
    answer as a crashing or misbehaving server would, and so does /cut-model/ for model.onnx."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        folder, _, name = self.path.strip("/").partition("/")
        if folder == "bad-status":
            self.wfile.write(b"garbage\r\n\r\n")
        elif folder == "cut-chunked" or (folder == "cut-model" and name == "model.onnx"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"100\r\nabc")  # a 256-byte chunk, then the connection drops
        elif folder == "cut-length":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"abc")
        else:
            data = (V2 / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


@pytest.fixture
def base() -> Iterator[str]:
    with http_server(BrokenBundleServer) as url:
        yield url


@pytest.mark.parametrize(("folder", "problem"), [
    ("bad-status", "malformed HTTP answer"),
    ("cut-chunked", "cut short"),
    ("cut-length", "cut short after 3 of 100 bytes"),
])
def test_a_broken_answer_is_a_bundle_error_naming_url_and_problem(
    base: str, folder: str, problem: str
) -> None:
    url = f"{base}/{folder}/{MANIFEST_FILE}"
    with pytest.raises(BundleError, match="download") as raised:
        download(url, 10.0)
    assert url in str(raised.value) and problem in str(raised.value)


def test_a_bundle_whose_model_transfer_is_cut_is_refused_and_nothing_is_kept(
    base: str, tmp_path: Path
) -> None:
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    signature = (V2 / SIGNATURE_FILE).read_text()
    with pytest.raises(BundleError, match=f"{base}/cut-model/model.onnx.*cut short"):
        fetch_bundle(f"{base}/cut-model/", model, signature, tmp_path, key=None, timeout=10.0)
    assert list(tmp_path.iterdir()) == [], "no staging folder or bundle left behind"


def _tiny_bundle(root: Path, files: dict[str, bytes]) -> tuple[Path, ModelRef, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    folder = make_bundle(root / "tiny" / "1.2.3", key, files=files)
    model = ModelRef(name="tiny", version="1.2.3", sha256=sha256_file(folder / MANIFEST_FILE))
    return folder, model, key


@pytest.mark.parametrize("file_name", ["notes v2.txt", "notes#2.txt", "why?.txt", "a%41.txt"])
def test_a_file_name_that_is_not_url_safe_is_fetched_by_its_own_name(
    tmp_path: Path, file_name: str
) -> None:
    folder, model, key = _tiny_bundle(tmp_path / "served", {file_name: b"the notes"})
    (folder / "aA.txt").write_bytes(b"a decoy")  # where an unquoted a%41.txt would lead
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with file_server(tmp_path / "served") as url:
        target = fetch_bundle(f"{url}/tiny/1.2.3/", model, (folder / SIGNATURE_FILE).read_text(),
                              data_dir, key=key.public_key(), timeout=10.0)
    assert (target / file_name).read_bytes() == b"the notes"


class EndlessModel(BaseHTTPRequestHandler):
    """Serves the bundle under /served/, except that model.onnx never ends."""

    root: Path

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        name = self.path.rpartition("/")[2]
        self.send_response(200)
        if name != a_model_file:
            data = (self.root / name).read_bytes()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.end_headers()
        try:
            for _ in range(64 * 1024):  # 64 MiB at most, so a failing test still ends
                self.wfile.write(b"\0" * 1024)
        except OSError:
            pass  # the station hung up: what it should do


a_model_file = "model.onnx"


def test_a_file_is_read_no_further_than_the_manifest_says(tmp_path: Path) -> None:
    folder, model, key = _tiny_bundle(tmp_path / "served", {})
    size = (folder / a_model_file).stat().st_size
    handler = type("Endless", (EndlessModel,), {"root": folder})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with http_server(handler) as url, pytest.raises(BundleError) as raised:
        fetch_bundle(f"{url}/tiny/1.2.3/", model, (folder / SIGNATURE_FILE).read_text(),
                     data_dir, key=key.public_key(), timeout=10.0)
    assert raised.value.check == "download"
    assert f"larger than the {size} bytes the manifest gives" in str(raised.value)
    assert list(data_dir.iterdir()) == [], "no staging folder or bundle left behind"


def test_a_model_larger_than_the_manifest_download_cap_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap bounds the manifest, which has no size to check against; every other file is
    bounded by the size the (digest-checked) manifest gives it."""
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    monkeypatch.setattr(bundle_fetch, "MAX_DOWNLOAD_BYTES", (V2 / MANIFEST_FILE).stat().st_size)
    assert (V2 / a_model_file).stat().st_size > bundle_fetch.MAX_DOWNLOAD_BYTES
    with file_server(V2.parent) as url:
        target = fetch_bundle(f"{url}/2.0.0/", model, (V2 / SIGNATURE_FILE).read_text(),
                              tmp_path, key=None, timeout=10.0)
    assert sha256_file(target / a_model_file) == sha256_file(V2 / a_model_file)


def test_a_staging_folder_left_by_an_interrupted_fetch_is_removed_by_the_next(
    tmp_path: Path
) -> None:
    """A power cut mid-download leaves a staging folder (as large as the bundle) behind; the
    next fetch clears it, so repeated interruptions do not fill the station's disk."""
    leftover = tmp_path / ".staging-interrupted"
    leftover.mkdir()
    (leftover / a_model_file).write_bytes(b"\0" * 4096)
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    with file_server(V2.parent) as url:
        target = fetch_bundle(f"{url}/2.0.0/", model, (V2 / SIGNATURE_FILE).read_text(),
                              tmp_path, key=None, timeout=10.0)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "bundles"]
    assert target.is_relative_to(tmp_path / "bundles")


class CountingServer(BaseHTTPRequestHandler):
    """Serves the shipped 2.0.0 bundle and counts the files asked for."""

    asked: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        name = self.path.rpartition("/")[2]
        type(self).asked.append(name)
        data = (V2 / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _fetch_v2(url: str, data_dir: Path) -> Path:
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    return fetch_bundle(f"{url}/2.0.0/", model, (V2 / SIGNATURE_FILE).read_text(), data_dir,
                        key=None, timeout=10.0)


def test_a_bundle_already_on_disk_intact_is_neither_downloaded_nor_replaced(
    tmp_path: Path,
) -> None:
    """A repeated deploy of a bundle the station holds (it may be the active model's own
    folder) keeps that folder in place: a power cut can never leave the station without it."""
    handler = type("Counting", (CountingServer,), {"asked": []})
    with http_server(handler) as url:
        first = _fetch_v2(url, tmp_path)
        inode = first.stat().st_ino
        handler.asked.clear()
        again = _fetch_v2(url, tmp_path)
    assert again == first and again.stat().st_ino == inode, "the same folder, not a new copy"
    assert handler.asked == [MANIFEST_FILE], "only the manifest, to learn which bundle it is"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "bundles"]


def test_a_damaged_bundle_on_disk_is_fetched_again_and_replaced(tmp_path: Path) -> None:
    handler = type("Counting", (CountingServer,), {"asked": []})
    with http_server(handler) as url:
        first = _fetch_v2(url, tmp_path)
        (first / a_model_file).write_bytes(b"bit rot")
        handler.asked.clear()
        again = _fetch_v2(url, tmp_path)
    assert again == first
    assert a_model_file in handler.asked
    assert sha256_file(again / a_model_file) == sha256_file(V2 / a_model_file)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "bundles"], "no copy left behind"


def test_a_manifest_signed_with_another_key_is_refused_before_any_model_file(
    tmp_path: Path,
) -> None:
    """A forged command (a station with `key:` but no `command_key:`) must not make the station
    download what the manifest announces before the signature is checked."""
    handler = type("Counting", (CountingServer,), {"asked": []})
    model = ModelRef(name="part-classifier", version="2.0.0",
                     sha256=sha256_file(V2 / MANIFEST_FILE))
    other_key = Ed25519PrivateKey.generate().public_key()
    with http_server(handler) as url, pytest.raises(BundleError) as refused:
        fetch_bundle(f"{url}/2.0.0/", model, (V2 / SIGNATURE_FILE).read_text(), tmp_path,
                     key=other_key, timeout=10.0)
    assert refused.value.check == "signature"
    assert handler.asked == [MANIFEST_FILE], "no model file was downloaded"
    assert not (tmp_path / "bundles").exists()
