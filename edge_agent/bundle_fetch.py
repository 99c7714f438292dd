"""Fetching a candidate bundle from the controller's bundle server for `deploy_candidate`.

The manifest is checked against the command's sha256 before anything else is downloaded, and
the whole bundle is verified (digests; the signature with the station's key) in a staging
folder, so a tampered or partial bundle never reaches its final place. Every other file is
streamed to disk and read no further than the size the manifest gives it.

The folders under `data_dir/bundles/` are the station's to keep or remove: `tidy_bundles`
removes the ones no slot needs any more (and the staging folders a crash left behind), so a
station that takes a new model every week does not fill its disk with the old ones.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from email.message import Message
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from linesight.artifacts import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    check_signature,
    parse_manifest,
    sha256_bytes,
    verify_bundle,
)
from linesight.disk_space import size_text
from linesight.fsync import fsync_path
from linesight.protocol import ModelRef

log = logging.getLogger(__name__)

BUNDLES_DIR = "bundles"
"""The folder of `data_dir` that fetched bundles go to, one `<name>/<version>-<sha>` each."""
MAX_DOWNLOAD_BYTES = 1024 * 1024
"""The most `download` reads: the manifest (a few KB), which has no size to be checked against.
A URL that streams (a camera's, a server gone wrong) is refused after this much, not held in
memory until the time-out."""
_BLOCK = 1 << 20
_STAGING_PREFIX = ".staging-"
_FETCHED_NAME = re.compile(r"^\d+\.\d+\.\d+-[0-9a-f]{12}$")
"""How `fetch_bundle` names the folders it makes; only those are the station's to remove."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect stays the HTTPError it is: a bundle comes from the URL the deploy names, never
    from another host or scheme (an FTP server, a proxy's sign-in page) a server points to."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: Message, newurl: str,
    ) -> urllib.request.Request | None:
        return None


class _Deadline:
    """The sockets of one transfer, shut down when its time is up: the socket time-out bounds
    each read only, and a server trickling its body, its headers or a chunk's size line would
    never hit it."""

    def __init__(self, timeout: float) -> None:
        self.passed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        self._sockets.append(sock)
        if self.passed.is_set():  # connected just as the time ran out
            _shut(sock)
        return sock

    def _expire(self) -> None:
        self.passed.set()
        for sock in list(self._sockets):
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Wake whatever thread reads `sock` (at the socket's level, under any TLS layer)."""
    with contextlib.suppress(OSError):  # closed already, or detached into a TLS socket
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment and all), with every socket it opens
    watched by `deadline` and no redirect followed."""

    def connected(*args: Any, **kwargs: Any) -> socket.socket:
        return deadline.watch(socket.create_connection(*args, **kwargs))

    class Http(http.client.HTTPConnection):
        def connect(self) -> None:
            self._create_connection = connected
            super().connect()

    class Https(http.client.HTTPSConnection):
        def connect(self) -> None:
            self._create_connection = connected
            super().connect()  # the handshake too is bounded: its plain socket is watched
            deadline.watch(self.sock)  # the TLS socket the plain one became

    class HttpHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Http, req)

    class HttpsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Https, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(HttpHandler, HttpsHandler, _NoRedirect)


def _transfer(
    url: str, timeout: float, limit: int, limit_text: str, sink: Callable[[bytes], object]
) -> None:
    """Stream the body at `url` into `sink` block by block. BundleError naming the URL and the
    problem otherwise: no connection, an HTTP error status, a redirect, a malformed answer, a
    transfer cut short, more than `limit` bytes (`limit_text` says what the limit is), or a
    transfer not done within `timeout` seconds, wherever it stalls."""
    if not url.startswith(("http://", "https://")):
        raise BundleError("download", f"refusing to download from {url!r}")
    received = 0

    def counted(block: bytes) -> None:
        nonlocal received
        received += len(block)
        sink(block)

    with _Deadline(timeout) as deadline:
        try:
            _receive(url, _opener(deadline), timeout, limit, limit_text, counted)
        except BundleError as exc:
            if not deadline.passed.is_set():
                raise
            cause: BundleError | None = exc
        else:
            cause = None
    if deadline.passed.is_set():  # the connection was shut: what came is not the whole file
        raise BundleError(
            "download", f"cannot download {url}: not done within {timeout:g} s "
            f"(download_timeout_s), {received} bytes received"
        ) from cause


def _receive(
    url: str, opener: urllib.request.OpenerDirector, timeout: float, limit: int,
    limit_text: str, sink: Callable[[bytes], object],
) -> None:
    received = 0
    try:
        with opener.open(url, timeout=timeout) as response:
            while block := response.read1(min(_BLOCK, limit + 1 - received)):
                received += len(block)
                if received > limit:  # read one byte past the limit, no more
                    raise BundleError("download", f"{url} is larger than {limit_text}")
                try:
                    sink(block)
                except OSError as exc:  # a full disk, ...
                    raise BundleError("download", f"cannot store {url}: {exc}") from exc
            missing: int | None = response.length  # what Content-Length announced and never came
    except urllib.error.HTTPError as exc:
        exc.close()  # its connection: an error answer must not keep a socket open
        if 300 <= exc.code < 400:
            raise BundleError(
                "download", f"cannot download {url}: the server answered HTTP {exc.code}, a "
                f"redirect to {exc.headers.get('Location', '(no Location)')}; redirects are "
                "not followed: the deploy's url must name the bundle server itself"
            ) from exc
        raise BundleError("download", f"cannot download {url}: {exc}") from exc
    except http.client.IncompleteRead as exc:  # a chunked transfer cut short
        raise BundleError(
            "download", f"cannot download {url}: the chunked transfer was cut short ({exc})"
        ) from exc
    except http.client.HTTPException as exc:  # BadStatusLine and the like
        raise BundleError("download", f"cannot download {url}: malformed HTTP answer {exc!r}"
                          ) from exc
    except OSError as exc:
        raise BundleError("download", f"cannot download {url}: {exc}") from exc
    if missing:
        raise BundleError(
            "download", f"cannot download {url}: the transfer was cut short after {received} "
            f"of {received + missing} bytes"
        )


def download(url: str, timeout: float) -> bytes:
    """The body at `url`, whole (at most MAX_DOWNLOAD_BYTES); BundleError naming the URL and the
    problem otherwise (no connection, an HTTP error status, a malformed answer, a transfer cut
    short)."""
    blocks: list[bytes] = []
    _transfer(url, timeout, MAX_DOWNLOAD_BYTES, f"{MAX_DOWNLOAD_BYTES} bytes", blocks.append)
    return b"".join(blocks)


def download_to(url: str, path: Path, timeout: float, size: int) -> None:
    """Stream the body at `url` into `path`, refusing it past `size` bytes (the manifest's);
    on the disk (fsynced) when it returns."""
    with path.open("wb") as stream:
        _transfer(url, timeout, size, f"the {size} bytes the manifest gives", stream.write)
        stream.flush()
        os.fsync(stream.fileno())


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def space_shortfall(needed: int, free: int, floor: int) -> int:
    """How many bytes short of keeping `floor` free a download of `needed` bytes would leave
    the disk with `free` bytes (0: none)."""
    return max(floor - (free - needed), 0)


def _check_space(data_dir: Path, needed: int, min_free_bytes: int) -> None:
    """BundleError when downloading `needed` bytes would take the disk below `min_free_bytes`:
    the room the station keeps for its outbox and review images."""
    if min_free_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(data_dir).free
    except OSError as exc:
        raise BundleError("disk-space", f"cannot measure the free space of {data_dir}: "
                          f"{exc}") from exc
    if space_shortfall(needed, free, min_free_bytes):
        raise BundleError(
            "disk-space", f"the bundle's files take {size_text(needed)} and {data_dir} has "
            f"{size_text(free)} free: that would leave less than the "
            f"{size_text(min_free_bytes)} the station keeps free for its outbox "
            "(storage.min_free_mb); free some space, then deploy again"
        )


def fetch_bundle(
    url: str,
    model: ModelRef,
    signature: str,
    data_dir: Path,
    *,
    key: Ed25519PublicKey | None,
    timeout: float,
    min_free_bytes: int = 0,
) -> Path:
    """Download the bundle at `url` into `data_dir/bundles/<name>/<version>-<sha>/`, verified
    and on the disk for good (files and folder names fsynced: the caller saves a slot naming
    it next); BundleError naming the check that failed otherwise, also when its files would
    leave less than `min_free_bytes` free (checked before they are downloaded)."""
    base = url if url.endswith("/") else url + "/"
    manifest_data = download(base + MANIFEST_FILE, timeout)
    if sha256_bytes(manifest_data) != model.sha256:
        raise BundleError("digest", "the downloaded manifest differs from the command's sha256")
    if key is not None:
        # Before any model file: a forged command must not make the station download the
        # gigabytes a manifest of its own choosing announces.
        check_signature(manifest_data, signature, key)
    manifest = parse_manifest(manifest_data)
    if (manifest.name, manifest.version) != (model.name, model.version):
        raise BundleError("manifest", "the manifest names another model than the command")
    target = data_dir / BUNDLES_DIR / manifest.name / f"{manifest.version}-{model.sha256[:12]}"
    if _holds_verified(target, manifest_data, key):
        return target  # fetched before (a repeated deploy): nothing to download or replace
    # A station fetches one bundle at a time: any staging folder here is one a crash or a
    # power cut left behind mid-download.
    clear_staging(data_dir)
    _check_space(data_dir, sum(entry.size for entry in manifest.files.values()),
                 min_free_bytes)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=data_dir))
    try:
        _write_synced(staging / MANIFEST_FILE, manifest_data)
        _write_synced(staging / SIGNATURE_FILE, (signature.strip() + "\n").encode())
        for file_name, entry in manifest.files.items():
            # Percent-encoded: a space, '#', '?' or '%' in a file name is part of the name.
            download_to(base + quote(file_name, safe=""), staging / file_name, timeout,
                        entry.size)
        verify_bundle(staging, key)
        fsync_path(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # A damaged copy: moved aside, not deleted, until the verified one is in its place
            # (a power cut in between leaves it as a staging folder that the next fetch clears).
            damaged = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=data_dir)) / "damaged"
            target.rename(damaged)
            staging.rename(target)
            shutil.rmtree(damaged.parent, ignore_errors=True)
        else:
            staging.rename(target)
        for folder in (target.parent, target.parent.parent, data_dir):
            fsync_path(folder)  # the bundle's new name, and the folders made for it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _holds_verified(
    folder: Path, manifest_data: bytes, key: Ed25519PublicKey | None
) -> bool:
    """Whether `folder` already holds this very bundle, every file intact (and signed, with a
    key): then fetching it again would only cost the line a download."""
    if not folder.is_dir():
        return False
    try:
        if (folder / MANIFEST_FILE).read_bytes() != manifest_data:
            return False
        verify_bundle(folder, key)
    except (OSError, BundleError):
        return False
    return True


def clear_staging(data_dir: Path) -> list[Path]:
    """Remove the staging folders in `data_dir`: what a crash or a power cut left of a download
    (or of a bundle folder being removed). Only while no fetch runs. The ones removed."""
    removed = []
    for leftover in sorted(data_dir.glob(f"{_STAGING_PREFIX}*")):
        shutil.rmtree(leftover, ignore_errors=True)
        if not leftover.exists():
            removed.append(leftover)
    return removed


def unneeded_bundles(folders: Iterable[Path], needed: Iterable[Path]) -> list[Path]:
    """The `folders` that no path in `needed` is, lies in or contains (paths resolved)."""
    keep = [path.resolve() for path in needed]
    return [
        folder for folder in folders
        if not any(k == folder.resolve() or folder.resolve() in k.parents
                   or k in folder.resolve().parents for k in keep)
    ]


def tidy_bundles(data_dir: Path, needed: Iterable[Path]) -> list[Path]:
    """Remove the staging folders a crash left and every bundle folder `fetch_bundle` made
    under `data_dir/bundles/` that no path in `needed` (the folders the slots run and the saved
    slots name, the configured ones) is, lies in or contains; a folder of another name (a bundle
    put there by hand) is never touched. Only while no fetch runs. Each folder is first renamed
    to a staging name, so a crash part-way leaves a staging folder for the next tidy, never a
    half-removed bundle under its own name. A folder that cannot be removed is logged and left.
    The bundle folders removed."""
    clear_staging(data_dir)
    root = data_dir / BUNDLES_DIR
    folders = sorted(path for path in root.glob("*/*")
                     if _FETCHED_NAME.match(path.name) and path.is_dir() and not path.is_symlink())
    removed = []
    for folder in unneeded_bundles(folders, needed):
        try:
            doomed = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=data_dir)) / "removed"
            folder.rename(doomed)
        except OSError as exc:
            log.error("bundle folder %s no slot needs could not be removed: %s", folder, exc)
            continue
        shutil.rmtree(doomed.parent, ignore_errors=True)
        log.info("removed bundle folder %s: no slot needs it any more", folder)
        removed.append(folder)
    for name in {folder.parent for folder in removed}:
        try:
            name.rmdir()  # the model's own folder, once its last bundle is gone
        except OSError:
            pass  # another version of it is kept
    return removed
