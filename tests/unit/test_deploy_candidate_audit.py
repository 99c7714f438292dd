"""How a station takes a candidate bundle from a bundle server that misbehaves, or from a bundle
that lies: a BundleError naming the cause, nothing left in the data dir, and no more read from
the server than a bundle may hold. Real HTTP servers on 127.0.0.1, the shipped 2.0.0 bundle and
bundles signed here."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle_fetch import fetch_bundle
from linesight.artifacts import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    BundleError,
    sha256_bytes,
    sha256_file,
    sign_manifest,
)
from linesight.protocol import ModelRef
from tests.support import V2, file_server, http_server
from tests.unit.test_artifacts import make_bundle

V2_MODEL = ModelRef(name="part-classifier", version="2.0.0",
                    sha256=sha256_file(V2 / MANIFEST_FILE))
V2_SIGNATURE = (V2 / SIGNATURE_FILE).read_text()


class Misbehaving(BaseHTTPRequestHandler):
    """Serves the shipped 2.0.0 bundle's files, except where `answers` (file name -> how)
    says otherwise; records each file asked for and every byte of body it sent."""

    answers: ClassVar[dict[str, str]] = {}
    asked: ClassVar[list[str]] = []
    sent: ClassVar[list[int]] = []
    elsewhere: ClassVar[str] = ""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        name = self.path.rpartition("/")[2]
        type(self).asked.append(name)
        how = self.answers.get(name, "file")
        try:
            getattr(self, f"answer_{how.partition(':')[0]}")(name, how.partition(":")[2])
        except OSError:
            pass  # the station hung up

    def answer_file(self, name: str, _: str) -> None:
        self._body((V2 / name).read_bytes())

    def _body(self, data: bytes, status: int = 200, kind: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if kind:
            self.send_header("Content-Type", kind)
        self.end_headers()
        self.wfile.write(data)
        type(self).sent.append(len(data))

    def answer_status(self, _: str, code: str) -> None:
        self._body(b"<html><body>no</body></html>", int(code), "text/html")

    def answer_html(self, _: str, __: str) -> None:
        self._body(b"<!doctype html><html><body>Sign in to the proxy</body></html>", 200,
                   "text/html")

    def answer_redirect(self, name: str, target: str) -> None:
        self.send_response(302)
        self.send_header("Location", target.replace("{elsewhere}", self.elsewhere) + name)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def answer_endless(self, _: str, __: str) -> None:
        self.send_response(200)
        self.end_headers()
        block = b"{" * 65536
        for _ in range(6 * 1024):  # 384 MiB at most, so that a failing test still ends
            self.wfile.write(block)
            type(self).sent.append(len(block))

    def answer_stall(self, name: str, _: str) -> None:
        data = (V2 / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:1000])
        self.wfile.flush()
        time.sleep(30)  # then the connection closes; the station gave up long before

    def answer_trickle(self, _: str, __: str) -> None:
        """The status line, then a header one byte at a time: each byte comes well within the
        socket time-out, the headers never end."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(600):  # a minute at most, so that a failing test still ends
            self.wfile.flush()
            time.sleep(0.1)
            self.wfile.write(b"a")


class Counting(BaseHTTPRequestHandler):
    """Another host a redirect may lead to: counts the requests that reach it."""

    hits: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.close_connection = True
        data = (V2 / self.path.rpartition("/")[2]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def elsewhere() -> Iterator[type[Counting]]:
    handler = type("Elsewhere", (Counting,), {"hits": []})
    with http_server(handler) as url:
        handler.base = url  # type: ignore[attr-defined]
        yield handler


def serve(answers: dict[str, str], elsewhere: str = "") -> Any:
    handler = type("Scripted", (Misbehaving,), {"answers": answers, "asked": [], "sent": [],
                                                "elsewhere": elsewhere})
    return handler, http_server(handler)


def fetch_v2(url: str, data_dir: Path, timeout: float = 10.0) -> Path:
    return fetch_bundle(f"{url}/part-classifier/2.0.0/", V2_MODEL, V2_SIGNATURE, data_dir,
                        key=None, timeout=timeout)


def refused(url: str, data_dir: Path, timeout: float = 10.0) -> BundleError:
    with pytest.raises(BundleError) as raised:
        fetch_v2(url, data_dir, timeout)
    assert list(data_dir.iterdir()) == [], "no staging folder or bundle left behind"
    return raised.value


# --- the server -----------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", [MANIFEST_FILE, MODEL_FILE])
@pytest.mark.parametrize("code", [404, 500])
def test_an_http_error_names_the_file_and_the_status(
    tmp_path: Path, file_name: str, code: int
) -> None:
    handler, server = serve({file_name: f"status:{code}"})
    with server as url:
        error = refused(url, tmp_path)
    assert error.check == "download"
    assert f"{url}/part-classifier/2.0.0/{file_name}" in str(error) and str(code) in str(error)


def test_an_html_page_for_the_manifest_is_refused_before_any_model_file(tmp_path: Path) -> None:
    handler, server = serve({MANIFEST_FILE: "html"})
    with server as url:
        error = refused(url, tmp_path)
    assert error.check == "digest" and "manifest" in error.detail
    assert handler.asked == [MANIFEST_FILE]


def test_an_html_page_for_the_model_is_refused(tmp_path: Path) -> None:
    handler, server = serve({MODEL_FILE: "html"})
    with server as url:
        error = refused(url, tmp_path)
    assert error.check == "size" and MODEL_FILE in error.detail


def test_a_transfer_that_stalls_midway_is_given_up(tmp_path: Path) -> None:
    handler, server = serve({MODEL_FILE: "stall"})
    with server as url:
        error = refused(url, tmp_path, timeout=1.0)
    assert error.check == "download" and f"{url}/part-classifier/2.0.0/{MODEL_FILE}" in str(error)
    assert "timed out" in str(error) or "not done within 1 s" in str(error)


def test_a_server_that_never_ends_its_headers_is_given_up_at_the_deadline(
    tmp_path: Path,
) -> None:
    """Each byte comes within the socket time-out, so only the transfer's own deadline ends it:
    a rollback queued behind the deploy must not wait for the server to run out of header."""
    handler, server = serve({MODEL_FILE: "trickle"})
    with server as url:
        error = refused(url, tmp_path, timeout=1.0)
    assert error.check == "download" and f"{url}/part-classifier/2.0.0/{MODEL_FILE}" in str(error)
    assert "not done within 1 s (download_timeout_s)" in str(error)


def test_a_manifest_that_never_ends_is_refused_after_a_manifest_s_worth(tmp_path: Path) -> None:
    """A URL that is a stream (a camera's, say) rather than a bundle: the manifest has no size
    to hold it to, so a bound of its own keeps the station's memory for the line."""
    handler, server = serve({MANIFEST_FILE: "endless"})
    with server as url:
        error = refused(url, tmp_path)
    assert error.check == "download" and "larger than" in str(error)
    assert sum(handler.sent) < 16 * 1024 * 1024, "read no further than any manifest can be"


@pytest.mark.parametrize("target", [
    "{elsewhere}/part-classifier/2.0.0/", "ftp://127.0.0.1:9/", "file:///etc/",
])
@pytest.mark.parametrize("file_name", [MANIFEST_FILE, MODEL_FILE])
def test_a_redirect_is_refused_naming_where_it_leads(
    tmp_path: Path, elsewhere: type[Counting], target: str, file_name: str
) -> None:
    """The deploy names the bundle server; a redirect to another host or scheme (an FTP server,
    a local file) is not followed, and the error says where it pointed."""
    handler, server = serve({file_name: f"redirect:{target}"},
                            elsewhere=elsewhere.base)  # type: ignore[attr-defined]
    with server as url:
        error = refused(url, tmp_path)
    location = target.replace("{elsewhere}", elsewhere.base) + file_name  # type: ignore[attr-defined]
    assert error.check == "download"
    assert f"{url}/part-classifier/2.0.0/{file_name}" in str(error)
    assert "redirect" in str(error) and location in str(error)
    assert elsewhere.hits == [], "nothing was asked of the host the redirect named"


# --- the bundle -----------------------------------------------------------------------------


def signed_bundle(folder: Path, key: Ed25519PrivateKey, manifest: dict[str, Any]) -> ModelRef:
    """Write `manifest` as it is (no schema applied) and sign it: a bundle whose signer lied."""
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (folder / MANIFEST_FILE).write_bytes(data)
    (folder / SIGNATURE_FILE).write_text(sign_manifest(data, key))
    return ModelRef(name=manifest["name"], version=manifest["version"], sha256=sha256_bytes(data))


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey, dict[str, Any]]:
    key = Ed25519PrivateKey.generate()
    folder = make_bundle(tmp_path / "served" / "tiny" / "1.2.3", key)
    return folder, key, json.loads((folder / MANIFEST_FILE).read_bytes())


def fetch_tiny(url: str, folder: Path, model: ModelRef, key: Ed25519PrivateKey,
               data_dir: Path) -> Path:
    return fetch_bundle(f"{url}/tiny/1.2.3/", model, (folder / SIGNATURE_FILE).read_text(),
                        data_dir, key=key.public_key(), timeout=10.0)


def tiny_refused(tmp_path: Path, folder: Path, model: ModelRef, key: Ed25519PrivateKey
                 ) -> BundleError:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with file_server(tmp_path / "served") as url, pytest.raises(BundleError) as raised:
        fetch_tiny(url, folder, model, key, data_dir)
    assert list(data_dir.iterdir()) == [], "no staging folder or bundle left behind"
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-by-bundle").exists()
    return raised.value


@pytest.mark.parametrize("name", [
    "../../escaped", "/tmp/escaped-by-bundle", "sub/escaped", "..", ".hidden", "a\\..\\escaped",
])
def test_a_file_name_leading_out_of_the_bundle_is_refused_before_its_download(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]], name: str
) -> None:
    folder, key, manifest = tiny
    manifest["files"][name] = {"sha256": "0" * 64, "size": 3}
    error = tiny_refused(tmp_path, folder, signed_bundle(folder, key, manifest), key)
    assert error.check == "manifest-schema" and repr(name) in error.detail


def test_a_manifest_giving_a_larger_size_than_the_file_has_is_refused(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]]
) -> None:
    folder, key, manifest = tiny
    manifest["files"][MODEL_FILE]["size"] += 10
    error = tiny_refused(tmp_path, folder, signed_bundle(folder, key, manifest), key)
    assert error.check == "size" and MODEL_FILE in error.detail


def test_a_manifest_giving_a_smaller_size_than_the_file_has_is_refused(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]]
) -> None:
    folder, key, manifest = tiny
    manifest["files"][MODEL_FILE]["size"] -= 10
    error = tiny_refused(tmp_path, folder, signed_bundle(folder, key, manifest), key)
    assert error.check == "download" and "larger than the" in str(error)


def test_a_manifest_naming_a_file_the_server_lacks_is_refused_naming_it(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]]
) -> None:
    folder, key, manifest = tiny
    manifest["files"]["labels.txt"] = {"sha256": "0" * 64, "size": 3}
    error = tiny_refused(tmp_path, folder, signed_bundle(folder, key, manifest), key)
    assert error.check == "download" and "labels.txt" in str(error) and "404" in str(error)


def test_a_model_file_that_is_not_onnx_is_refused(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]]
) -> None:
    folder, key, manifest = tiny
    html = b"<html>not a model</html>"
    (folder / MODEL_FILE).write_bytes(html)
    manifest["files"][MODEL_FILE] = {"sha256": sha256_bytes(html), "size": len(html)}
    error = tiny_refused(tmp_path, folder, signed_bundle(folder, key, manifest), key)
    assert error.check == "onnx-parse" and MODEL_FILE in error.detail


def test_files_the_manifest_does_not_list_are_not_downloaded(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]]
) -> None:
    folder, key, manifest = tiny
    (folder / "extra.bin").write_bytes(b"not listed")
    (folder / ".hidden").write_bytes(b"not listed")
    model = ModelRef(name="tiny", version="1.2.3", sha256=sha256_file(folder / MANIFEST_FILE))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with file_server(tmp_path / "served") as url:
        target = fetch_tiny(url, folder, model, key, data_dir)
    assert sorted(path.name for path in target.iterdir()) == [
        MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE,
    ]


def test_a_manifest_other_than_the_command_s_is_refused_before_any_model_file(
    tmp_path: Path,
) -> None:
    handler, server = serve({})
    other = ModelRef(name="part-classifier", version="2.0.0", sha256="f" * 64)
    with server as url, pytest.raises(BundleError) as raised:
        fetch_bundle(f"{url}/part-classifier/2.0.0/", other, V2_SIGNATURE, tmp_path, key=None,
                     timeout=10.0)
    assert raised.value.check == "digest" and handler.asked == [MANIFEST_FILE]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signature", ["   ", "not base64!", "QUJD"])
def test_a_bad_or_empty_signature_is_refused_when_a_key_is_configured(
    tmp_path: Path, tiny: tuple[Path, Ed25519PrivateKey, dict[str, Any]], signature: str
) -> None:
    folder, key, _ = tiny
    model = ModelRef(name="tiny", version="1.2.3", sha256=sha256_file(folder / MANIFEST_FILE))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with file_server(tmp_path / "served") as url, pytest.raises(BundleError) as raised:
        fetch_bundle(f"{url}/tiny/1.2.3/", model, signature, data_dir, key=key.public_key(),
                     timeout=10.0)
    assert raised.value.check == "signature"
    assert list(data_dir.iterdir()) == []


def test_a_full_disk_while_staging_is_refused_and_nothing_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up under the model file (another writer took the room meanwhile)."""
    import errno

    real_open = Path.open

    class FullDisk:
        """The model file's stream, on a disk with no room left."""

        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stream, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stream.close()

    def filling_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = real_open(self, mode, *args, **kwargs)
        return FullDisk(stream) if self.name == MODEL_FILE and "w" in mode else stream

    monkeypatch.setattr(Path, "open", filling_open)
    handler, server = serve({})
    with server as url:
        error = refused(url, tmp_path)
    assert error.check == "download" and "No space left on device" in str(error)


def test_a_bundle_that_would_take_the_disk_below_its_floor_is_refused_before_downloading(
    tmp_path: Path,
) -> None:
    """The manifest gives every file's size: a bundle that would leave less free space than
    the station keeps for its outbox and review images (storage.min_free_mb) is refused before
    its model file is asked for, instead of filling the disk under the outbox meanwhile."""
    import shutil

    from edge_agent.bundle_fetch import space_shortfall

    manifest = json.loads((V2 / MANIFEST_FILE).read_bytes())
    needed = sum(entry["size"] for entry in manifest["files"].values())
    # A floor 64 MiB above what the download would leave: refused whatever else writes here.
    floor = shutil.disk_usage(tmp_path).free - needed + 64 * 1024 * 1024
    handler, server = serve({})
    with server as url, pytest.raises(BundleError) as raised:
        fetch_bundle(f"{url}/part-classifier/2.0.0/", V2_MODEL, V2_SIGNATURE, tmp_path,
                     key=None, timeout=10.0, min_free_bytes=floor)
    assert raised.value.check == "disk-space", raised.value
    assert "storage.min_free_mb" in str(raised.value), raised.value
    assert handler.asked == [MANIFEST_FILE]
    assert list(tmp_path.iterdir()) == []
    # the rule itself
    assert space_shortfall(needed=100, free=1000, floor=900) == 0
    assert space_shortfall(needed=101, free=1000, floor=900) == 1
    assert space_shortfall(needed=0, free=10, floor=900) == 890
