"""Downloading a candidate bundle from a bundle server that breaks off or answers garbage: always
a BundleError naming the URL and the problem. The server is a real one on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from edge_agent.bundle_fetch import download, fetch_bundle
from linesight.artifacts import MANIFEST_FILE, SIGNATURE_FILE, BundleError, sha256_file
from linesight.protocol import ModelRef
from tests.support import V2, http_server


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
