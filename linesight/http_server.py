"""A WSGI app served by waitress: on a thread of its own, stoppable from the caller (the
controller's API), or in the foreground (the station UI).

Waitress reads each request whole on its event loop before a worker thread sees it, so a slow
client holds a connection, not a thread; but it takes a limited number of connections at once,
and its idle timeout counts any byte as activity. A client that opens connections and sends
each request a byte at a time would hold every connection for as long as it likes, and the
station's own screen would wait behind it. So here a request must arrive whole within
`REQUEST_TIMEOUT_S` of its first byte, and one client address may hold only
`CONNECTIONS_PER_ADDRESS` of the `CONNECTION_LIMIT` connections.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from typing import Any

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, MultiSocketServer

log = logging.getLogger(__name__)

BODY_SLACK = 64 * 1024
"""Room above the app's own limit for chunked framing: the app refuses an over-long body that
the server let through in its own words (a JSON 413 from the API)."""

CONNECTION_LIMIT = 200
"""Connections open at once (waitress's default is 100); further ones wait in the listen
backlog until one closes. Room for a fleet of stations fetching bundles at once."""

CONNECTIONS_PER_ADDRESS = 25
"""How many of them one client address may hold (a browser opens at most 6 to a server): a
connection past it is answered 503 and closed, so one host cannot take them all."""

REQUEST_TIMEOUT_S = 20
"""From the first byte of a request to its last, head and body: past it the request is answered
408 and the connection closed. The largest body either app takes is the API's 1 MiB of JSON
(bundles are only downloaded), which takes well under a second on a plant network."""

IDLE_TIMEOUT_S = 30
"""A connection with no request in progress and nothing sent or received for this long is
closed (waitress's `channel_timeout`, 120 s by default); a browser opens a new one when it
needs it. A slow download goes on as long as it moves."""

CLEANUP_INTERVAL_S = 5
"""How often waitress looks for idle connections (30 s by default)."""

_WARN_EVERY_S = 60.0
_last_warning: dict[str, float] = {}


def max_request_body_size(app: Any) -> int:
    """The body waitress takes in at most for `app`: a little over what a Flask app reads
    (MAX_CONTENT_LENGTH), so an announced or chunked body past it is refused before the server
    spools it to memory or a temporary file (waitress's own default is 1 GiB per request)."""
    limit = getattr(app, "config", {}).get("MAX_CONTENT_LENGTH")
    return 1024 * 1024 + BODY_SLACK if limit is None else int(limit) + BODY_SLACK


def _warn(kind: str, message: str, *args: object) -> None:
    """A warning at most once a minute per kind: a flood of bad clients must not flood the log."""
    now = time.monotonic()
    if now - _last_warning.get(kind, -math.inf) >= _WARN_EVERY_S:
        _last_warning[kind] = now
        log.warning(message + " (more like it are not logged for a minute)", *args)


def _host(addr: Any) -> Any:
    """The client's address without its port."""
    return addr[0] if isinstance(addr, tuple) else addr


def _refusal(status: str, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (
        f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Channel(HTTPChannel):  # type: ignore[misc]  # waitress has no type hints
    """Waitress's connection, with a deadline for each request and a share per address."""

    request_started: float | None = None
    """When the first byte of the request being received arrived; None between requests."""

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        host = _host(addr)
        held = sum(1 for channel in server.active_channels.values() if _host(channel.addr) == host)
        if held > CONNECTIONS_PER_ADDRESS:  # this one included
            _warn("per-address", "refusing connections from %s: it holds %d already",
                  host, CONNECTIONS_PER_ADDRESS)
            self._refuse("503 Service Unavailable", f"too many connections from {host} (at "
                         f"most {CONNECTIONS_PER_ADDRESS} at once)")

    def received(self, data: bytes) -> bool:
        before = self.request
        taken = bool(super().received(data))
        if self.request is None:
            self.request_started = None
        elif self.request is not before:
            self.request_started = time.monotonic()
        return taken

    def readable(self) -> bool:
        # The event loop asks every connection at least once a second (its poll timeout).
        if self._overdue(time.monotonic()):
            _warn("request-timeout", "closing a connection from %s: its request took longer "
                  "than %d s to arrive", _host(self.addr), REQUEST_TIMEOUT_S)
            self._refuse("408 Request Timeout",
                         f"the request took longer than {REQUEST_TIMEOUT_S} s to arrive")
        return bool(super().readable())

    def _overdue(self, now: float) -> bool:
        started = self.request_started
        return (started is not None and not self.requests and not self.close_when_flushed
                and not self.will_close and now - started > REQUEST_TIMEOUT_S)

    def _refuse(self, status: str, reason: str) -> None:
        """Answer `status` and close once it is sent; the request is not read any further."""
        answer = _refusal(status, reason)
        with self.outbuf_lock:
            self.outbufs[-1].append(answer)
            self.current_outbuf_count += len(answer)
            self.total_outbufs_len += len(answer)
        self.request = None
        self.request_started = None
        self.close_when_flushed = True


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets (http://[::1]:8700)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _create(app: Any, host: str, port: int, *, threads: int, ident: str) -> Any:
    # Resolved here so that a name that is not an address is said as such (socket.gaierror,
    # e.g. "Name or service not known"): waitress says only "Invalid host/port specified."
    socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    server = waitress.create_server(
        app, host=host, port=port, threads=threads, ident=ident,
        clear_untrusted_proxy_headers=True, max_request_body_size=max_request_body_size(app),
        connection_limit=CONNECTION_LIMIT, channel_timeout=IDLE_TIMEOUT_S,
        cleanup_interval=CLEANUP_INTERVAL_S,
        # poll() rather than select(): no ceiling of 1024 on descriptor numbers.
        asyncore_use_poll=True,
    )
    listeners = server.map.values() if isinstance(server, MultiSocketServer) else [server]
    for listener in listeners:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = _Channel
    return server


def serve(app: Any, host: str, port: int, *, threads: int = 4, ident: str = "linesight") -> None:
    """Serve `app` on this thread until the process ends (or Ctrl-C)."""
    logging.basicConfig()
    server = _create(app, host, port, threads=threads, ident=ident)
    server.print_listen("Serving on http://{}:{}")
    server.run()


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, *, threads: int = 4) -> None:
        # Binding happens here, so a taken port is an error at start-up, not in a thread.
        self._server = _create(app, host, port, threads=threads, ident="linesight")
        self.host = host
        self.port: int = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name=f"http-{self.port}",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        # The workers first: one finishing a request pulls the trigger to wake the loop, and
        # after the trigger is closed that write would hit a closed (or reused) descriptor.
        server.task_dispatcher.shutdown()
        if self._thread.is_alive():
            # Close every socket on the server's own loop thread (waitress runs a trigger's
            # thunks there): closed from here, a socket its poll() is watching could be
            # reported closed, or its number reused by another socket, under the loop. The
            # thunk closes the trigger too, so it must not run before our wake-up byte is
            # written: the loop runs thunks under the trigger's lock, which is held here until
            # the byte is in the pipe. With its map empty, the loop returns.
            trigger = server.trigger
            with trigger.lock:
                trigger.thunks.append(lambda: wasyncore.close_all(server._map))
                trigger._physical_pull()
            self._thread.join(timeout=5)
        else:
            server.close()
