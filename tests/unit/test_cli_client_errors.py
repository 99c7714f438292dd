"""`linesight fleet ...` against something that is not a healthy controller: a mistyped rollout
id or URL, a server that does not speak HTTP, one that answers something other than the API's
JSON, one that does not answer in time. Each ends with one line on stderr, never a traceback."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from linesight.broker import free_port
from linesight.cli import main

Handler = Callable[[socket.socket], None]
SEEN: list[str] = []


@pytest.fixture
def raw_server() -> Iterator[Callable[[Handler], str]]:
    """A TCP server on a free port that runs `handler` on each connection; gives its URL."""
    sockets: list[socket.socket] = []

    def start(handler: Handler) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sockets.append(listener)

        def serve() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    handler(connection)

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in sockets:
        listener.close()


@pytest.fixture
def json_server() -> Iterator[Callable[[bytes], str]]:
    """An HTTP server that answers every request 200 with `body`; gives its URL. The paths it
    was asked for are in SEEN."""
    servers: list[http.server.HTTPServer] = []
    SEEN.clear()

    def start(body: bytes) -> str:
        class Answer(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                SEEN.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def test_a_rollout_id_with_a_space_is_sent_quoted(
    json_server: Callable[[bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = json_server(b'{"error": "no rollout"}')
    status, err = run(capsys, "fleet", "rollout", "abort", "--id", "a b/..", "--controller", url)
    assert SEEN == ["/api/rollouts/a%20b%2F../abort"]
    # The server answers a JSON object that is not a rollout: the CLI says so, no traceback.
    assert status == 2
    assert "linesight fleet: error:" in err


def test_a_controller_url_with_a_port_that_is_not_a_number_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, err = run(capsys, "fleet", "stations", "--controller", "http://127.0.0.1:abc")
    assert status == 2
    assert "linesight fleet: error: controller URL 'http://127.0.0.1:abc'" in err


def test_a_server_that_does_not_speak_http_is_named(
    raw_server: Callable[[Handler], str], capsys: pytest.CaptureFixture[str]
) -> None:
    def garbage(connection: socket.socket) -> None:
        connection.recv(4096)
        connection.sendall(b"\x20\x02\x00\x00garbage\r\n\r\n")

    url = raw_server(garbage)
    status, err = run(capsys, "fleet", "stations", "--controller", url)
    assert status == 2
    assert f"linesight fleet: error: {url} does not answer like a Linesight controller" in err


@pytest.mark.parametrize("body", [b"<html>hello</html>", b'{"x": 1}', b"[1, 2]", b"\xff\xfe"])
def test_an_answer_that_is_not_the_controllers_json_is_named(
    body: bytes, json_server: Callable[[bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = json_server(body)
    for argv in (("fleet", "stations"), ("fleet", "rollout", "status"),
                 ("fleet", "rollout", "pause")):
        status, err = run(capsys, *argv, "--controller", url)
        assert status == 2, argv
        assert f"linesight fleet: error: {url} does not answer like a Linesight controller" in err


def test_a_controller_that_does_not_answer_in_time_is_not_called_absent(
    raw_server: Callable[[Handler], str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """A POST that timed out may still have taken effect: the message must not say that no
    controller runs (the user would start the rollout again), and must say how to check."""
    from deploy import client

    monkeypatch.setattr(client.ControllerClient.__init__, "__defaults__", (None, 0.5))
    release = threading.Event()

    def silent(connection: socket.socket) -> None:
        connection.recv(4096)
        release.wait(5)

    url = raw_server(silent)
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\n")
    try:
        status, err = run(capsys, "fleet", "rollout", "start", str(plan),
                          "--candidate", "part-classifier:2.0.0", "--controller", url)
    finally:
        release.set()
    assert status == 3  # not 2: that says it was not done
    assert "no controller is running" not in err
    assert f"the controller at {url} did not answer within 0.5 s" in err
    assert "linesight fleet rollout status" in err


@pytest.mark.parametrize("station", ["a/b", "", ".x", "s" * 65, "st 1"])
def test_realign_refuses_what_cannot_be_a_station_id_before_asking(
    capsys: pytest.CaptureFixture[str], station: str
) -> None:
    # No controller runs at this address: the id is refused before anything is asked.
    status, err = run(capsys, "fleet", "realign", station, "--controller",
                      f"http://127.0.0.1:{free_port()}")
    assert status == 2
    assert f"linesight fleet: error: {station!r} is not a station id" in err


@pytest.mark.parametrize("argv", [(), ("st-1", "--all")])
def test_realign_wants_either_station_ids_or_all(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    status, err = run(capsys, "fleet", "realign", *argv, "--controller",
                      f"http://127.0.0.1:{free_port()}")
    assert status == 2
    assert "linesight fleet: error: name the stations to realign, or give --all" in err
