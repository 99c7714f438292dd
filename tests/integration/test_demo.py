"""`linesight demo` end to end: the line comes up, the regressed model is rolled back, and
nothing is left running afterwards."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import StationStore
from linesight.broker import Broker, start_broker
from linesight.demo import Line, preferred_port, run_demo
from tests.support import wait_for

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The demo takes its preferred ports (8700, 8801.., 9101..) when free: two demos started at the
# same moment by two test workers could both find one free, and one demo's rollout went to the
# other's controller. `--dist loadfile` (pyproject.toml) runs every test of this file in one
# worker, one after the other.


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_rolls_back_a_regressed_model_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "linesight.cli", "demo", "--scenario", "regressed",
         "--exit-when-done", "--workdir", str(workdir), "--rate", "15",
         "--operator-delay", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fleet dashboard" in result.stdout and "press-03" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-2])["summary"]
    assert summary["outcome"] == "rolled_back"
    assert summary["parts_decided_by_candidate"] == 0
    assert summary["escaped_defects"]["candidate"] == 0
    pids = json.loads((workdir / "processes.json").read_text())
    assert set(pids) >= {"controller", "mosquitto", "agent-press-01", "ui-press-03"}
    assert not [name for name, pid in pids.items() if alive(pid)], "processes left behind"


def test_ctrl_c_stops_the_whole_line(tmp_path: Path) -> None:
    # SIGINT, what Ctrl-C in the terminal sends; SIGTERM (kill, a service manager) is the next
    # test's first signal.
    signum, code, said = signal.SIGINT, 130, "stopping the line"
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "demo", "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "rollout r-" not in log.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "rollout r-" in log.read_text(), "the line did not come up"
        demo.send_signal(signum)
        assert demo.wait(120) == code
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert said in log.read_text()
    pids = json.loads((workdir / "processes.json").read_text())
    assert not [name for name, pid in pids.items() if alive(pid)], "processes left behind"
    # The stations' data stays, and the stations stopped before the controller: everything
    # they sent on their way out was receipted, so every decision is in the fleet store.
    assert (workdir / "fleet" / "fleet.db").exists()
    for station in ("press-01", "press-02", "press-03"):
        with StationStore(workdir / station) as store:
            assert store.outbox_depth() == 0, f"{station} still owes messages"


def test_sigterm_stops_the_line_and_further_signals_are_only_noted(tmp_path: Path) -> None:
    # A station that does not stop (SIGSTOP) holds the demo's stop for 20 s, the time it gives a
    # station to drain its outbox; a second Ctrl-C, SIGTERM or SIGHUP then must not cut it short.
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "demo", "--workdir", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    pids: dict[str, int] = {}
    try:
        wait_for(lambda: "rollout r-" in log.read_text() or demo.poll() is not None, 120,
                 "the line to come up")
        assert demo.poll() is None, log.read_text()[-3000:]
        pids = json.loads((workdir / "processes.json").read_text())
        os.kill(pids["agent-press-01"], signal.SIGSTOP)
        demo.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping the line" in log.read_text(), 60, "the stop to begin")
        for second in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            demo.send_signal(second)
        assert demo.wait(120) == 143  # the first signal's status
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in pids.values():  # what a cut-short stop left running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    said = log.read_text()
    assert "SIGTERM: stopping the line" in said
    assert said.count("stopping, please wait") == 1, said[-3000:]
    assert "agent-press-01 did not stop in time; killing it" in said
    assert "Traceback" not in said, said[-3000:]
    assert not [name for name, pid in pids.items() if alive(pid)], "processes left behind"
    # The stations that did stop drained their outboxes before the controller was stopped.
    for station in ("press-02", "press-03"):
        with StationStore(workdir / station) as store:
            assert store.outbox_depth() == 0, f"{station} still owes messages"


class SignalDuringTest(Exception):  # noqa: N818 - a signal, raised by the test's own handler
    pass


class RaiseOnce:
    """Like the default Ctrl-C handler, the first signal raises; later ones are only counted
    (so they cannot cut the test's own clean-up short)."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise SignalDuringTest(signum)


def _stand_in(ready: Path, on_sigterm: str = "sys.exit(0)") -> str:
    """A piece of the line that signals `ready` once its SIGTERM handler is in place."""
    return (
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: ({on_sigterm}))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(600)\n"
    )


def test_line_stop_carries_on_through_further_signals(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    line = Line(tmp_path)
    # The station, told to stop, sends this process a Ctrl-C, a SIGTERM and a SIGHUP: they
    # arrive while Line.stop() waits for it, before the controller, screen and broker are stopped.
    second_signals = (
        "[os.kill(os.getppid(), s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)],"
        " sys.exit(0)"
    )
    broker = line.broker = start_broker(tmp_path / "broker")
    mosquitto = broker.pid
    outer = RaiseOnce()
    previous = {sig: signal.signal(sig, outer) for sig in STOP_SIGNALS}
    try:
        for name, code in (("agent-press-01", _stand_in(tmp_path / "agent", second_signals)),
                           ("controller", _stand_in(tmp_path / "controller")),
                           ("ui-press-01", _stand_in(tmp_path / "ui-press-01"))):
            line.processes[name] = subprocess.Popen([sys.executable, "-c", code])
        wait_for(lambda: all((tmp_path / name).exists()
                             for name in ("agent", "controller", "ui-press-01")),
                 60, "the stand-ins to start")
        line.stop()
        assert all(signal.getsignal(sig) is outer for sig in STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in line.processes.values():
            process.kill()
            process.wait()
        broker.stop()
    assert outer.received == []
    assert all(process.returncode == 0 for process in line.processes.values())
    assert mosquitto is not None and not alive(mosquitto)
    assert capfd.readouterr().out.count("stopping, please wait") == 1


def test_a_failure_stopping_one_piece_does_not_leave_the_others_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    line = Line(tmp_path)
    broker = line.broker = start_broker(tmp_path / "broker")
    for name in ("agent-press-01", "controller"):
        line.processes[name] = subprocess.Popen([sys.executable, "-c", _stand_in(tmp_path / name)])
    wait_for(lambda: (tmp_path / "agent-press-01").exists() and (tmp_path / "controller").exists(),
             60, "the stand-ins to start")
    agent, controller = line.processes["agent-press-01"], line.processes["controller"]
    mosquitto = broker.pid

    def fails(timeout: float | None = None) -> int:
        raise OSError("no such child")

    monkeypatch.setattr(agent, "wait", fails)
    try:
        line.stop()
    finally:
        for process in (agent, controller):
            process.kill()
            subprocess.Popen.wait(process)
        broker.stop()
    assert "could not stop agent-press-01: no such child" in capsys.readouterr().out
    assert agent.returncode == 0, "the agent was still told to stop"
    assert controller.returncode == 0
    assert mosquitto is not None and not alive(mosquitto)


def test_a_ctrl_c_while_the_broker_starts_stops_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []

    def interrupted_start(broker: Broker) -> Broker:
        broker.data_dir.mkdir(parents=True, exist_ok=True)
        broker._spawn()
        started.append(broker._process)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # Ctrl-C while mosquitto comes up

    monkeypatch.setattr(Broker, "start", interrupted_start)
    args = argparse.Namespace(scenario="good", workdir=tmp_path / "demo", rate=10.0,
                              operator_delay=0.0, exit_when_done=True, timeout=60.0)
    try:
        assert run_demo(args) == 130
        [mosquitto] = started
        assert mosquitto.poll() is not None, "the broker was left running"
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_preferred_port_takes_a_port_in_time_wait_but_not_one_in_use() -> None:
    # What a previous demo leaves: its server (SO_REUSEADDR, like waitress and prometheus_client)
    # closed its connections first, so they linger in TIME_WAIT on its port. The next server
    # binds that port all the same, so the demo keeps it.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            connection, _ = server.accept()
            connection.close()
            assert client.recv(1) == b""  # the server's FIN
    wait_for(lambda: _in_time_wait(port), 30, f"port {port} in TIME_WAIT")
    assert preferred_port(port) == port
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert preferred_port(taken.getsockname()[1]) != taken.getsockname()[1]


def _in_time_wait(port: int) -> bool:
    """A TIME_WAIT connection on 127.0.0.1:`port`, from /proc/net/tcp (state 06)."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "06":
            return True
    return False


def test_a_ctrl_c_while_a_piece_starts_leaves_it_known_to_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen_then_ctrl_c(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
        started.append(process)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C after the fork, before Popen has returned
        return process

    line = Line(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", popen_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            line.spawn("agent-press-01", "agent")
        assert list(line.processes) == ["agent-press-01"], "the stop would not know the piece"
        assert json.loads((tmp_path / "processes.json").read_text()) == {
            "agent-press-01": line.processes["agent-press-01"].pid
        }
    finally:
        signal.signal(signal.SIGINT, previous)
        for process in started:
            process.kill()
            process.wait()
