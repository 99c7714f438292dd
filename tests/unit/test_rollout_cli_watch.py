"""`linesight fleet rollout status --watch` while the controller restarts: a small HTTP server
on 127.0.0.1 that answers as the controller does, then goes away for a request, then answers
again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from linesight.cli import EXIT_NOT_DONE, main
from tests.support import answering_server


def rollout(phase: str) -> bytes:
    doc = {"rollout_id": "r-1", "candidate": {"name": "m", "version": "2.0.0"}, "plan": "p",
           "phase": phase, "phase_detail": phase, "stage": 0, "stages": [], "reason": ""}
    body = json.dumps(doc).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.fixture
def restarting() -> Iterator[str]:
    """Answers: a running rollout; nothing (the connection closed: restarting); promoted."""
    with answering_server([rollout("running"), None, rollout("promoted")]) as url:
        yield url


def test_watching_goes_on_through_a_controller_restart(
    restarting: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor watching a rollout while the controller is restarted (an upgrade, a
    systemd restart) used to be thrown out with an error, though the rollout went on."""
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    assert main(["fleet", "rollout", "status", "--watch", "--controller", restarting]) == 0
    out, err = capsys.readouterr()
    assert "phase running" in out and "phase promoted" in out, out
    assert "closed the connection without answering" in err and "still watching" in err, err


def test_watching_a_controller_that_is_not_there_says_so_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens at port 9.
    status = main(["fleet", "rollout", "status", "--watch", "--controller", "http://127.0.0.1:9"])
    assert status == EXIT_NOT_DONE
    assert "no controller is running" in capsys.readouterr().err
