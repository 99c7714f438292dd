"""The reject gate: a webhook that misbehaves is reported, never stops the gate, and a redirect is
never taken for the POST's success. The endpoints are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_agent.actuator import BackgroundGate, PartSignal, WebhookGate
from linesight import protocol as p
from tests.support import wait_for

WAIT_S = 30.0  # generous: only ever waited out when something is wrong


def decision(seq: int) -> PartSignal:
    return PartSignal.of(p.Decision(
        station="press-01", seq=seq, part_id=f"part-{seq}", decided_by=p.DecidedBy.ACTIVE,
        label="defect", confidence=0.99, action=p.Action.REJECT,
        automation=p.AutomationLevel.FULL, mode=p.DeploymentMode.NONE, latency_ms=1.0,
        review_reason=None, model=p.ModelRef(name="m", version="1.0.0", sha256="0" * 64),
        suggestion="defect",
    ))


class Endpoint:
    """A PLC gateway stand-in: `answer(method, path, n)` gives the raw bytes of the n-th request's
    answer (n counts from 1); `seen` lists (method, path) of every request."""

    def __init__(self, answer: Callable[[str, str, int], bytes]) -> None:
        self.seen: list[tuple[str, str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.seen.append((self.command, self.path))
                self.wfile.write(answer(self.command, self.path, len(endpoint.seen)))
                self.close_connection = True

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/reject"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    started: list[Endpoint] = []
    yield started
    for endpoint in started:
        endpoint.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("broken", [
    b"garbage\r\n\r\n",  # not an HTTP status line (BadStatusLine)
    b"HTTP/1.1 200 OK\r\n" + b"X-Filler: y\r\n" * 101 + b"\r\n",  # HTTPException
], ids=["bad-status-line", "too-many-headers"])
def test_a_malformed_answer_is_reported_and_the_gate_keeps_signalling(
    endpoints: list[Endpoint], broken: bytes
) -> None:
    endpoint = Endpoint(lambda method, path, n: broken if n == 1 else OK)
    endpoints.append(endpoint)
    errors: list[str] = []
    oks: list[int] = []
    gate = BackgroundGate(WebhookGate(endpoint.url, 5.0), on_error=errors.append,
                          on_ok=lambda: oks.append(1))
    for seq in range(5):
        gate.act(decision(seq))
    wait_for(lambda: len(oks) == 4, WAIT_S, "the four parts after the broken answer signalled")
    assert len(endpoint.seen) == 5
    assert len(errors) == 1 and endpoint.url in errors[0]
    gate.close()


def test_a_gate_raising_anything_is_reported_and_the_next_part_still_goes_out() -> None:
    signalled: list[str] = []

    class Buggy:
        def act(self, decision: PartSignal) -> None:
            if decision.seq == 0:
                raise KeyError("a bug in an integrator's gate")
            signalled.append(decision.part_id)

    errors: list[str] = []
    gate = BackgroundGate(Buggy(), on_error=errors.append)
    for seq in range(3):
        gate.act(decision(seq))
    wait_for(lambda: len(signalled) == 2, WAIT_S, "the parts after the failing one signalled")
    assert len(errors) == 1 and "KeyError" in errors[0]
    gate.close()


def test_close_returns_with_a_hung_endpoint_and_a_full_queue() -> None:
    started = threading.Event()
    release = threading.Event()
    signalled: list[str] = []

    class Hung:
        def act(self, decision: PartSignal) -> None:
            signalled.append(decision.part_id)
            started.set()
            release.wait(WAIT_S)

    errors: list[str] = []
    gate = BackgroundGate(Hung(), on_error=errors.append, max_backlog=2)
    gate.act(decision(0))
    assert started.wait(WAIT_S)
    for seq in (1, 2, 3):  # two fill the queue, the third is refused
        gate.act(decision(seq))
    assert len(errors) == 1 and "behind" in errors[0]

    closing = threading.Thread(target=gate.close, kwargs={"timeout": 0.1}, daemon=True)
    closing.start()
    closing.join(WAIT_S)
    assert not closing.is_alive(), "close() blocked on a full queue"
    release.set()
    gate._thread.join(WAIT_S)
    assert not gate._thread.is_alive(), "the gate thread goes on after close gave up"
    assert signalled == ["part-0"], "parts still queued when close gave up are not signalled"


def redirect(code: int) -> bytes:
    return (f"HTTP/1.1 {code} Moved\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("code", [301, 302, 303, 307])
def test_a_redirect_is_an_error_naming_status_and_location_and_is_not_followed(
    endpoints: list[Endpoint], code: int
) -> None:
    page = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin"
    endpoint = Endpoint(lambda method, path, n: redirect(code) if method == "POST" else page)
    endpoints.append(endpoint)
    with pytest.raises(OSError, match=rf"HTTP {code}.*/login"):
        WebhookGate(endpoint.url, 5.0).act(decision(1))
    assert endpoint.seen == [("POST", "/reject")], "the redirect was followed"


def test_a_redirect_raises_the_fault_and_no_success_clears_it(endpoints: list[Endpoint]) -> None:
    page = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin"
    endpoint = Endpoint(lambda method, path, n: redirect(302) if method == "POST" else page)
    endpoints.append(endpoint)
    errors: list[str] = []
    oks: list[int] = []
    gate = BackgroundGate(WebhookGate(endpoint.url, 5.0), on_error=errors.append,
                          on_ok=lambda: oks.append(1))
    gate.act(decision(1))
    wait_for(lambda: bool(errors or oks), WAIT_S, "the part signalled")
    gate.close()
    assert oks == [] and "302" in errors[0]
