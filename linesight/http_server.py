"""A WSGI app served by waitress on a thread of its own, stoppable from the caller."""

from __future__ import annotations

import threading
from typing import Any

import waitress
from waitress import wasyncore

BODY_SLACK = 64 * 1024
"""Room above the app's own limit for chunked framing: the app refuses an over-long body that
the server let through in its own words (a JSON 413 from the API)."""


def max_request_body_size(app: Any) -> int:
    """The body waitress takes in at most for `app`: a little over what a Flask app reads
    (MAX_CONTENT_LENGTH), so an announced or chunked body past it is refused before the server
    spools it to memory or a temporary file (waitress's own default is 1 GiB per request)."""
    limit = getattr(app, "config", {}).get("MAX_CONTENT_LENGTH")
    return 1024 * 1024 + BODY_SLACK if limit is None else int(limit) + BODY_SLACK


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, *, threads: int = 4) -> None:
        # Binding happens here, so a taken port is an error at start-up, not in a thread.
        self._server = waitress.create_server(
            app, host=host, port=port, threads=threads, ident="linesight",
            clear_untrusted_proxy_headers=True, max_request_body_size=max_request_body_size(app),
        )
        self.host = host
        self.port: int = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name=f"http-{self.port}",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
            # thunks there): closed from here, a socket its select() is watching fails that
            # select with EBADF and kills the thread. The thunk closes the trigger too, so it
            # must not run before our wake-up byte is written: the loop runs thunks under the
            # trigger's lock, which is held here until the byte is in the pipe. With its map
            # empty, the loop returns.
            trigger = server.trigger
            with trigger.lock:
                trigger.thunks.append(lambda: wasyncore.close_all(server._map))
                trigger._physical_pull()
            self._thread.join(timeout=5)
        else:
            server.close()
