"""The WSGI server thread: served, then stopped cleanly, even with connections still open."""

from __future__ import annotations

import http.client
import logging
import threading
from typing import Any

import pytest

from linesight.http_server import HttpServer


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
