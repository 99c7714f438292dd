"""`linesight fleet rollout approve` without `--stage`, and the CLI's exit status when a request
went out unanswered. The CLI against a controller's real API (a controller over a copy of the
shipped bundle, never started, served on 127.0.0.1) or against a server that hangs up."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.api import create_app
from deploy.client import ControllerClient
from deploy.controller import Controller
from deploy.rollout import Phase
from linesight.cli import EXIT_MAYBE_DONE, EXIT_NOT_DONE, main
from linesight.http_server import HttpServer
from tests.support import V2, answering_server, unstarted_controller

pytestmark = pytest.mark.skipif(not (V2 / "manifest.json").exists(),
                                reason=f"needs the shipped model bundle {V2}")

PLAN = """
name: three approvals
stages:
  - name: shadow on s1
    stations: [s1]
    mode: shadow
    approval: true
    exit: {min_parts: 150, min_labelled_disagreements: 12, max_duration_s: 300}
  - name: canary on s1
    stations: [s1]
    mode: canary
    fraction: 0.1
    approval: true
    exit: {min_parts: 150, min_labelled_disagreements: 12, max_duration_s: 300}
  - name: promote
    stations: [s1]
    mode: promote
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Controller, str]]:
    controller = unstarted_controller(tmp_path)
    server = HttpServer(create_app(controller), "127.0.0.1", 0)
    server.start()
    try:
        ControllerClient(server.url).start_rollout(PLAN, "part-classifier", "2.0.0")
        yield controller, server.url
    finally:
        server.stop()
        controller.store.close()


def waiting_at(controller: Controller, stage: int) -> None:
    """The rollout as when stage `stage` (an index) passed and waits for its approval."""
    assert controller.rollout is not None
    controller.rollout = controller.rollout.model_copy(
        update={"phase": Phase.WAITING_APPROVAL, "stage": stage})


def approve(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["fleet", "rollout", "approve", "--by", "alice", "--controller", url])
    out, err = capsys.readouterr()
    return status, out, err


def test_approve_without_a_stage_approves_the_one_it_saw_waiting_and_says_which(
    served: tuple[Controller, str], capsys: pytest.CaptureFixture[str]
) -> None:
    controller, url = served
    waiting_at(controller, 0)
    status, out, err = approve(url, capsys)
    assert status == 0, err
    assert out.startswith("approved stage 1 'shadow on s1'\n"), out
    assert controller.rollout is not None
    assert controller.rollout.phase == Phase.RUNNING and controller.rollout.stage == 1
    assert any(line.endswith("approved by alice") for line in controller.rollout.history)


def test_approve_does_not_approve_a_stage_that_came_to_wait_after_it_looked(
    served: tuple[Controller, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice sees stage 1 waiting and approves it; just before her request lands, Bob's
    approval of stage 1 went through and stage 2 passed. Her approve must not approve stage 2,
    which nobody has looked at."""
    controller, url = served
    waiting_at(controller, 0)
    act = ControllerClient.act

    def bob_first(self: ControllerClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        waiting_at(controller, 1)
        return act(self, *args, **kwargs)

    monkeypatch.setattr(ControllerClient, "act", bob_first)
    status, out, err = approve(url, capsys)
    assert status == EXIT_NOT_DONE, out
    assert "stage 1 'shadow on s1' is not waiting for approval" in err, err
    assert controller.rollout is not None
    assert controller.rollout.phase == Phase.WAITING_APPROVAL and controller.rollout.stage == 1


def test_approve_with_nothing_waiting_says_so_and_asks_nothing(
    served: tuple[Controller, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller, url = served
    sent: list[str] = []
    monkeypatch.setattr(ControllerClient, "act", lambda self, *a, **k: sent.append("act"))
    status, _, err = approve(url, capsys)
    assert status == EXIT_NOT_DONE
    assert controller.rollout is not None
    assert f"nothing to approve: the current rollout {controller.rollout.rollout_id} is " \
        "running at stage 1 'shadow on s1'" in err, err
    assert sent == []


def test_approve_with_no_rollout_at_all_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    controller = unstarted_controller(tmp_path)
    server = HttpServer(create_app(controller), "127.0.0.1", 0)
    server.start()
    try:
        status, _, err = approve(server.url, capsys)
    finally:
        server.stop()
        controller.store.close()
    assert status == EXIT_NOT_DONE
    assert "nothing to approve: no rollout has run on this controller" in err, err


@pytest.fixture
def hanging_up() -> Iterator[str]:
    """A server that reads the request and closes the connection without an answer: a
    controller killed or restarted while it handled the request."""
    with answering_server(itertools.repeat(None)) as url:
        yield url


def test_a_request_that_may_have_happened_exits_apart_from_a_refusal(
    hanging_up: str, served: tuple[Controller, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A script that aborts a rollout must tell "refused: nothing happened" (2) from "cut
    off: it may have happened, look before sending it again" (3)."""
    _, url = served
    assert main(["fleet", "rollout", "resume", "--controller", url]) == EXIT_NOT_DONE
    assert "cannot resume a rollout that is running" in capsys.readouterr().err
    assert main(["fleet", "rollout", "abort", "--controller", hanging_up]) == EXIT_MAYBE_DONE
    assert "what was asked may still happen" in capsys.readouterr().err
    # A read changes nothing: cut off, it was not done.
    assert main(["fleet", "rollout", "status", "--controller", hanging_up]) == EXIT_NOT_DONE
