"""The WSGI server thread: served, then stopped cleanly, even with connections still open."""

from __future__ import annotations

import http.client
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from linesight import http_server
from linesight.broker import free_port
from linesight.http_server import CONNECTION_LIMIT, CONNECTIONS_PER_ADDRESS, HttpServer
from tests.support import wait_for


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def test_stop_ends_the_server_thread_without_an_error_while_a_client_keeps_a_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each stop races the worker that just answered: it wakes the loop as the loop closes."""
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    for _ in range(100):
        server = HttpServer(hello, "127.0.0.1", 0).start()
        client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            client.request("GET", "/")  # HTTP/1.1: the connection stays open after the answer
            assert client.getresponse().read() == b"ok"
            server.stop()
            assert not server._thread.is_alive(), "the server thread ended"  # noqa: SLF001
        finally:
            client.close()  # even after a failure: a socket left to the GC fails a later test
    assert failures == [], f"the server thread failed: {failures[:1]}"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], f"a worker failed: {errors[:1]}"


def test_a_server_that_never_started_stops_too() -> None:
    server = HttpServer(hello, "127.0.0.1", 0)
    server.stop()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=2).request("GET", "/")


# --- slow clients -------------------------------------------------------------------------------
# A request arrives whole before a worker thread sees it, so a client that sends its request a
# byte at a time holds a connection, not a thread; but the server takes a limited number of
# connections at once, and one trickled byte counts as activity for its idle timeout.


class Tricklers:
    """Connections from `sources` that each send the start of a request, then one byte every
    half second for as long as the server keeps them open."""

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for source in sources:
            for _ in range(per_source):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                                source_address=(source, 0))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sock.setblocking(False)
                self._open.append(sock)
        self.opened = len(self._open)
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    @property
    def still_open(self) -> int:
        with self._lock:
            return len(self._open)

    def _trickle(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._open = [sock for sock in self._open if self._keep_going(sock)]

    @staticmethod
    def _keep_going(sock: socket.socket) -> bool:
        """One more byte; False (and the socket closed) once the server has closed it."""
        try:
            while sock.recv(4096):  # an answer (a refusal), then the end of the connection
                pass
        except BlockingIOError:  # nothing to read: the server still waits for the request
            try:
                sock.send(b"x")
                return True
            except OSError:
                pass
        except OSError:
            pass
        sock.close()
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            for sock in self._open:
                sock.close()
            self._open = []


def answered(port: int, path: str = "/") -> bool:
    """A request from 127.0.0.1, as the station's own screen sends it, answered 200."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        client.request("GET", path)
        return client.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        client.close()


@pytest.fixture
def server() -> Iterator[HttpServer]:
    running = HttpServer(hello, "127.0.0.1", 0).start()
    yield running
    running.stop()


def test_one_host_cannot_hold_every_connection(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host opening more connections than the server takes at once, each trickling its
    request (and no deadline on the request, to see the share alone): it keeps its share, the
    rest are refused, and another host is answered."""
    monkeypatch.setattr(http_server, "REQUEST_TIMEOUT_S", 3600)
    tricklers = Tricklers(server.port, ["127.0.0.2"], per_source=CONNECTION_LIMIT + 50)
    try:
        wait_for(lambda: answered(server.port), 30, "a request from another host to be answered")
        wait_for(lambda: tricklers.still_open == CONNECTIONS_PER_ADDRESS, 30,
                 f"the trickling host to keep {CONNECTIONS_PER_ADDRESS} connections")
    finally:
        tricklers.close()


def test_a_request_that_never_ends_is_cut_off(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts that each keep a few connections trickling (within their share): every one of them
    is closed, although it never fell silent. (The deadline is cut to 3 s for the test: a byte
    every 0.5 s keeps each connection far from idle all the same.)"""
    monkeypatch.setattr(http_server, "REQUEST_TIMEOUT_S", 3)
    sources = [f"127.0.0.{n}" for n in range(2, 10)]
    tricklers = Tricklers(server.port, sources, per_source=8)
    try:
        wait_for(lambda: tricklers.still_open == 0, 90,
                 f"the server to close {tricklers.opened} trickled requests")
        assert answered(server.port)
    finally:
        tricklers.close()


def test_the_station_screen_stays_usable_while_a_host_trickles_requests(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "linesight.cli", "ui", "--data-dir", str(tmp_path / "data"),
               "--port", str(port)]
    with log.open("wb") as stderr:
        ui = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: ui.poll() is None and answered(port, "/login"), 30,
                 "the station UI to answer")
        tricklers = Tricklers(port, ["127.0.0.2"], per_source=CONNECTION_LIMIT + 50)
        try:
            wait_for(lambda: answered(port, "/login"), 30, "the sign-in page to be answered")
        finally:
            tricklers.close()
    finally:
        ui.terminate()
        ui.wait(timeout=15)
