"""What a station and the fleet controller hold after months of broker outages, reconnects,
broker refusals and relay restarts: nothing that grows with their number (descriptors, threads,
child processes, messages waiting in memory, log lines). A real Mosquitto, stopped and started
by the tests many times."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent import relay as relay_module
from edge_agent.relay import OutboxRelay, RelayProcess, RelaySpec
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import Broker, free_port, start_broker, write_password_file
from linesight.mqtt import LinkConfig, MqttLink
from tests.integration.test_agent_broker_denied import deploy_guide_acl
from tests.support import DEMO_PUB, MODELS, V1, children_of, wait_for
from tests.unit.test_store import decision

OUTAGES = 20
# Descriptors a process may open or close between two looks for reasons of its own (a lazily
# opened file, a connection being replaced): far below one per outage.
SLACK = 3
# Per outage and process: lost, cannot connect, connected, and paho's own line on the socket.
LINES_PER_OUTAGE = 6
# Reconnect at once after a broker restart: the tests' outages last a fraction of a second.
FAST_BACKOFF = ("broker.backoff_min_s=0.05", "broker.backoff_max_s=0.1")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _sets(settings: tuple[str, ...]) -> list[str]:
    return [argument for setting in settings for argument in ("--set", setting)]


def station_process(root: Path, broker: Broker, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "agent", "--station", "press-07",
             "--broker", broker.url, "--source", "synthetic:seed=5,rate=20", "--active", str(V1),
             "--automation", "full", "--data-dir", str(root / "station"), "--key", str(DEMO_PUB),
             *_sets(FAST_BACKOFF)],
            stdout=subprocess.DEVNULL, stderr=stream,
        )


def controller_process(root: Path, broker: Broker, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "linesight.cli", "fleet", "serve", "--broker", broker.url,
             "--data-dir", str(root / "fleet"), "--bundles", str(MODELS), "--key", str(DEMO_PUB),
             "--http-port", str(free_port()), *_sets(FAST_BACKOFF)],
            stdout=subprocess.DEVNULL, stderr=stream,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _lines(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines())


def _failed(log: Path) -> int:
    return log.read_text(errors="replace").count(": cannot connect to ")


def _connects(log: Path) -> int:
    return log.read_text(errors="replace").count(" connected to ")


def test_broker_restarts_leave_no_descriptors_threads_children_or_log_flood(
    tmp_path: Path, broker: Broker
) -> None:
    station_log, controller_log = tmp_path / "station.log", tmp_path / "controller.log"
    controller = controller_process(tmp_path, broker, controller_log)
    station = station_process(tmp_path, broker, station_log)
    try:
        # The station's link, its relay's and the controller's: three connects per outage.
        wait_for(lambda: _connects(station_log) >= 2 and _connects(controller_log) >= 1, 30,
                 "the station, its relay and the controller to connect")
        (relay,) = children_of(station.pid)
        pids = {"station": station.pid, "relay": relay, "controller": controller.pid}
        before = {name: (descriptors(pid), threads(pid)) for name, pid in pids.items()}
        lines_before = _lines(station_log) + _lines(controller_log)

        for _ in range(OUTAGES):
            # An outage each link notices by a failed connect: a broker back before anyone tried
            # again looks like another client taking the session over (docs/agent.md).
            failed = _failed(station_log), _failed(controller_log)
            broker.stop()
            wait_for(lambda failed=failed: _failed(station_log) >= failed[0] + 2  # type: ignore[misc]
                     and _failed(controller_log) >= failed[1] + 1, 30,
                     "the station, its relay and the controller to try the broker in vain")
            connected = _connects(station_log), _connects(controller_log)
            broker.start()
            wait_for(lambda connected=connected: _connects(station_log) >= connected[0] + 2  # type: ignore[misc]
                     and _connects(controller_log) >= connected[1] + 1, 30,
                     "the station, its relay and the controller to connect again")

        after = {name: (descriptors(pid), threads(pid)) for name, pid in pids.items()}
        for name in pids:
            (fds_before, threads_before), (fds_after, threads_after) = before[name], after[name]
            assert fds_after <= fds_before + SLACK, (
                f"{name}: {fds_before} descriptors before {OUTAGES} broker restarts, {fds_after} "
                "after"
            )
            assert threads_after <= threads_before, (
                f"{name}: {threads_before} threads before, {threads_after} after"
            )
        assert children_of(station.pid) == [relay], "the same relay, and no zombie beside it"
        logged = _lines(station_log) + _lines(controller_log) - lines_before
        assert logged <= OUTAGES * 3 * LINES_PER_OUTAGE, (
            f"{logged} log lines for {OUTAGES} broker restarts:\n"
            + station_log.read_text()[-3000:]
        )
        assert "client_id_conflict" not in station_log.read_text()
    finally:
        _stop(station)
        _stop(controller)


def test_relay_restarts_leave_no_descriptors_threads_or_zombies(
    tmp_path: Path, broker: Broker
) -> None:
    StationStore(tmp_path / "station").close()
    relay = RelayProcess(RelaySpec(
        station="press-07", topic_prefix=p.DEFAULT_PREFIX, data_dir=tmp_path / "station",
        max_outbox_rows=1000, publish_batch=100, resend_after_s=5.0,
        broker=LinkConfig(url=broker.url, client_id="linesight-agent-press-07"),
    ))
    me = os.getpid()
    relay.start()
    try:
        fds_before, threads_before = descriptors(me), threads(me)
        children_before = set(children_of(me))
        for _ in range(OUTAGES):
            dying = relay.pid
            assert dying is not None
            os.kill(dying, signal.SIGKILL)
            wait_for(lambda: not relay.alive(), 10, "the relay to die")
            relay.start()  # what the agent's supervision does
            relay.wake()
        assert descriptors(me) <= fds_before + SLACK
        assert threads(me) <= threads_before
        children = set(children_of(me)) - children_before
        assert children == {relay.pid}, "one relay, and no zombie of the ones that died"
    finally:
        relay.stop()


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    """A broker whose ACL lets user press-01 write press-01's topics only."""
    password = secrets.token_urlsafe(12)
    passwd = write_password_file(tmp_path / "passwd", {"press-01": password})
    acl = tmp_path / "linesight.acl"
    acl.write_text(deploy_guide_acl())
    with start_broker(tmp_path / "refusing", password_file=passwd, acl_file=acl) as broker:
        yield broker, password


def _running(relay: OutboxRelay) -> Callable[[], None]:
    stopping = threading.Event()
    thread = threading.Thread(target=relay.run, args=(lambda: not stopping.is_set(),),
                              daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        relay.wake.set()
        thread.join(10)

    return stop


def test_a_broker_that_refuses_the_outbox_does_not_pile_copies_up_in_memory(
    tmp_path: Path, refusing_broker: tuple[Broker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """press-02 configured with press-01's credentials: Mosquitto closes each connection after
    the first message it refuses. Each reconnect used to add another copy of a whole batch to
    the messages waiting for a PUBACK, beside the copies the link sends again by itself: one
    batch a minute, for as long as nobody fixed the ACL."""
    broker, password = refusing_broker
    monkeypatch.setattr(relay_module, "ACK_WAIT_S", 0.2)  # a minute's rounds in a second
    topics = p.Topics()
    rows = 150
    with StationStore(tmp_path / "station") as store:
        for n in range(rows):
            store.enqueue(topics.station("press-02", p.Channel.DECISION), 1, decision(f"p-{n}"))
        link = MqttLink(LinkConfig(
            url=broker.url, client_id="linesight-agent-press-02-outbox", username="press-01",
            password=password, refused_retry_s=0.1, takeover_retry_s=0.1,
        ))
        relay = OutboxRelay(store, link, station="press-02", topics=topics, publish_batch=50,
                            resend_after_s=5.0)
        relay.attach()
        link.start()
        stop = _running(relay)
        try:
            for _ in range(8):
                attempts = link.connect_attempts
                wait_for(lambda attempts=attempts: link.connect_attempts > attempts,  # type: ignore[misc]
                         10, "the relay to connect again")
            assert link.unacknowledged <= rows, (
                f"{link.unacknowledged} messages wait for a PUBACK, for {rows} rows in the outbox"
            )
        finally:
            stop()
            link.stop()
        assert store.outbox_depth() == rows, "nothing is lost meanwhile"
