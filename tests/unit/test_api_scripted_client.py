"""The CLI's exit status when the controller's answer breaks off partway (the controller
killed or restarted while it sent it): a stand-in server on 127.0.0.1 that sends the start of
an answer and hangs up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from linesight.cli import EXIT_MAYBE_DONE, EXIT_NOT_DONE, main
from tests.support import answering_server

BODY = b'{"rollout_id": "r-1", "phase": "paused"'
CUT_OFF = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: 4000\r\n\r\n" + BODY)


@pytest.fixture
def cut_off() -> Iterator[str]:
    with answering_server([CUT_OFF]) as url:
        yield url


def test_an_action_whose_answer_breaks_off_may_have_happened(
    cut_off: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The controller was sending its 200: the pause happened. "Not done" (2) would have a
    script pause again, or report a failure that is not one."""
    status = main(["fleet", "rollout", "pause", "--controller", cut_off])
    err = capsys.readouterr().err
    assert status == EXIT_MAYBE_DONE, err
    assert "does not answer like a Linesight controller" not in err, err
    assert "what was asked may still happen" in err and "linesight fleet rollout status" in err


def test_a_read_whose_answer_breaks_off_says_to_try_again(
    cut_off: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["fleet", "rollout", "status", "--controller", cut_off])
    err = capsys.readouterr().err
    assert status == EXIT_NOT_DONE
    assert "does not answer like a Linesight controller" not in err, err
    assert "try again" in err, err


def test_a_refusal_whose_answer_breaks_off_is_still_a_refusal(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """The status line said 409: nothing was done, whatever the lost explanation said."""
    refusal = (b"HTTP/1.1 409 CONFLICT\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: 4000\r\n\r\n" + b'{"error": "cannot')
    with answering_server([refusal]) as url:
        status = main(["fleet", "rollout", "pause", "--controller", url])
    err = capsys.readouterr().err
    assert status == EXIT_NOT_DONE, err
    assert "controller answered 409" in err, err


def _proxy_answer(code: int, reason: str) -> bytes:
    page = f"<html><body><h1>{code} {reason}</h1>nginx</body></html>".encode()
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/html\r\nConnection: close\r\n"
            f"Content-Length: {len(page)}\r\n\r\n").encode() + page


@pytest.mark.parametrize(("code", "reason"), [(502, "Bad Gateway"), (504, "Gateway Time-out")])
def test_an_action_a_proxy_gave_up_on_may_have_happened(
    code: int, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reverse proxy in front of the controller gave up waiting (504) or lost the upstream
    connection (502) after passing the request on: the controller may have done it."""
    with answering_server([_proxy_answer(code, reason)]) as url:
        status = main(["fleet", "rollout", "pause", "--controller", url])
    err = capsys.readouterr().err
    assert status == EXIT_MAYBE_DONE, err
    assert f"{code}" in err and "proxy" in err, err
    assert "what was asked may still happen" in err, err


def test_a_read_a_proxy_gave_up_on_says_to_try_again(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with answering_server([_proxy_answer(504, "Gateway Time-out")]) as url:
        status = main(["fleet", "rollout", "status", "--controller", url])
    err = capsys.readouterr().err
    assert status == EXIT_NOT_DONE, err
    assert "504" in err and "try again" in err, err
