"""The HTTP servers refuse a request body larger than the app would read before they take it in:
anyone on the plant network can reach the controller's port (stations download bundles from it),
and a body the server took whole first would sit in memory or a temporary file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.api import MAX_REQUEST_BYTES, create_app
from linesight.broker import free_port
from linesight.http_server import HttpServer
from tests.support import unstarted_controller, wait_for

HUGE = 500 * 1024 * 1024


@pytest.fixture
def controller_port(tmp_path: Path) -> Iterator[int]:
    controller = unstarted_controller(tmp_path)
    server = HttpServer(create_app(controller), "127.0.0.1", 0).start()
    try:
        yield server.port
    finally:
        server.stop()
        controller.store.close()


def _status_line(sock: socket.socket) -> bytes:
    """The first line of the answer; b"" when the server says nothing within the time-out."""
    answer = b""
    try:
        while b"\r\n" not in answer:
            block = sock.recv(4096)
            if not block:
                break
            answer += block
    except TimeoutError:
        pass
    return answer.partition(b"\r\n")[0]


def _announce(port: int, path: str, length: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        return _status_line(sock)


def test_a_body_announced_larger_than_the_api_reads_is_refused_before_it_is_sent(
    controller_port: int,
) -> None:
    assert _announce(controller_port, "/api/rollouts", HUGE).startswith(b"HTTP/1.1 413")


def test_a_chunked_body_is_cut_off_once_it_passes_what_the_api_reads(
    controller_port: int,
) -> None:
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", controller_port), timeout=5) as sock:
        sock.sendall(b"POST /api/rollouts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 64 * MAX_REQUEST_BYTES:
                sock.sendall(frame)
                sent += len(chunk)
        except OSError:  # the server closed the connection: what it answered is below
            pass
        assert sent < 64 * MAX_REQUEST_BYTES, "the server took 64 MiB of a chunked body"
        assert _status_line(sock).startswith(b"HTTP/1.1 413")


def test_a_body_the_api_reads_is_still_taken(controller_port: int) -> None:
    body = b"{}"
    with socket.create_connection(("127.0.0.1", controller_port), timeout=5) as sock:
        sock.sendall(b"POST /api/rollouts/current/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n" + body)
        assert _status_line(sock).startswith(b"HTTP/1.1 404")  # no rollout: read and answered


def test_the_station_ui_refuses_a_huge_body_before_it_is_sent(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "linesight.cli", "ui", "--data-dir", str(tmp_path),
               "--port", str(port)]
    log = tmp_path / "ui.log"
    with log.open("wb") as stderr:
        ui = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def listening() -> bool:
            assert ui.poll() is None, log.read_text()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 30, "the station UI to listen")
        started = time.monotonic()
        assert _announce(port, "/login", HUGE).startswith(b"HTTP/1.1 413")
        assert time.monotonic() - started < 5
    finally:
        ui.terminate()
        ui.wait(timeout=15)
