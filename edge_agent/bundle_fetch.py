"""Fetching a candidate bundle from the controller's bundle server for `deploy_candidate`.

The manifest is checked against the command's sha256 before anything else is downloaded, and
the whole bundle is verified (digests; the signature with the station's key) in a staging
folder, so a tampered or partial bundle never reaches its final place.
"""

from __future__ import annotations

import http.client
import shutil
import tempfile
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from linesight.artifacts import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    parse_manifest,
    sha256_bytes,
    verify_bundle,
)
from linesight.protocol import ModelRef

MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


def download(url: str, timeout: float) -> bytes:
    """The body at `url`, whole; BundleError naming the URL and the problem otherwise (no
    connection, an HTTP error status, a malformed answer, a transfer cut short)."""
    if not url.startswith(("http://", "https://")):
        raise BundleError("download", f"refusing to download from {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - checked
            data: bytes = response.read(MAX_DOWNLOAD_BYTES + 1)
            missing: int | None = response.length  # what Content-Length announced and never came
    except http.client.IncompleteRead as exc:  # a chunked transfer cut short
        raise BundleError(
            "download", f"cannot download {url}: the chunked transfer was cut short ({exc})"
        ) from exc
    except http.client.HTTPException as exc:  # BadStatusLine and the like
        raise BundleError("download", f"cannot download {url}: malformed HTTP answer {exc!r}"
                          ) from exc
    except OSError as exc:
        raise BundleError("download", f"cannot download {url}: {exc}") from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise BundleError("download", f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    if missing:
        raise BundleError(
            "download", f"cannot download {url}: the transfer was cut short after {len(data)} "
            f"of {len(data) + missing} bytes"
        )
    return data


def fetch_bundle(
    url: str,
    model: ModelRef,
    signature: str,
    data_dir: Path,
    *,
    key: Ed25519PublicKey | None,
    timeout: float,
) -> Path:
    """Download the bundle at `url` into `data_dir/bundles/<name>/<version>-<sha>/`, verified;
    BundleError naming the check that failed otherwise."""
    base = url if url.endswith("/") else url + "/"
    manifest_data = download(base + MANIFEST_FILE, timeout)
    if sha256_bytes(manifest_data) != model.sha256:
        raise BundleError("digest", "the downloaded manifest differs from the command's sha256")
    manifest = parse_manifest(manifest_data)
    if (manifest.name, manifest.version) != (model.name, model.version):
        raise BundleError("manifest", "the manifest names another model than the command")
    target = data_dir / "bundles" / manifest.name / f"{manifest.version}-{model.sha256[:12]}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=data_dir))
    try:
        (staging / MANIFEST_FILE).write_bytes(manifest_data)
        (staging / SIGNATURE_FILE).write_text(signature.strip() + "\n")
        for file_name in manifest.files:
            (staging / file_name).write_bytes(download(base + file_name, timeout))
        verify_bundle(staging, key)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
