"""mqtts:// end to end: a mosquitto TLS listener with a CA made by the test."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import logging
import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy.rollout import ADVISORY_FAULTS
from edge_agent.agent import Agent
from edge_agent.relay import RelayProcess
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import TlsFiles, free_port, start_broker, write_password_file
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage
from tests.support import Receipter, agent_running, station_config, wait_for


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca_and_server(
    folder: Path,
    *,
    valid_from: timedelta = timedelta(minutes=-1),
    valid_until: timedelta = timedelta(days=1),
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> TlsFiles:
    """A CA (ca.pem, its key beside it) and a server certificate it signs for `names`, valid
    from now + `valid_from` to now + `valid_until`."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("linesight test CA"))
        .issuer_name(_name("linesight test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=60)).not_valid_after(now + timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "ca.key").write_bytes(_pem_key(ca_key))
    return issue_server(
        folder, folder / "ca.pem", valid_from=valid_from, valid_until=valid_until, names=names
    )


def issue_server(
    folder: Path,
    ca_file: Path,
    *,
    valid_from: timedelta = timedelta(minutes=-1),
    valid_until: timedelta = timedelta(days=1),
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> TlsFiles:
    """A server certificate signed by the CA in `ca_file` (its key beside it, as ca.key)."""
    now = datetime.now(UTC)
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_file.with_name("ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from).not_valid_after(now + valid_until)
        .add_extension(x509.SubjectAlternativeName([_san(name) for name in names]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(ca_file, folder / "server.pem", folder / "server.key")
    files.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(_pem_key(key))
    return files


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# paho-mqtt leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_station_talks_over_tls_and_refuses_an_unknown_ca(tmp_path: Path) -> None:
    tls = make_ca_and_server(tmp_path)
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        assert broker.url.startswith("mqtts://")
        got = threading.Event()
        received: list[ReceivedMessage] = []

        def keep(message: ReceivedMessage) -> None:
            received.append(message)
            got.set()

        link = MqttLink(LinkConfig(url=broker.url, client_id="tls-station",
                                   ca_file=tls.ca_file))
        link.subscribe("linesight/v1/stations/s1/decision", keep)
        link.start()
        try:
            assert link.wait_connected(10), link.fatal_error
            link.publish("linesight/v1/stations/s1/decision", b"{}", qos=1).wait(5)
            assert got.wait(10) and received[0].payload == b"{}"
        finally:
            link.stop()

        stranger = make_ca_and_server(_fresh(tmp_path / "other"))
        untrusting = MqttLink(LinkConfig(url=broker.url, client_id="tls-stranger",
                                         ca_file=stranger.ca_file))
        untrusting.start()
        try:
            assert not untrusting.wait_connected(3), "a server from an unknown CA was trusted"
            wait_for(lambda: untrusting.tls_error is not None, 10, "the TLS failure")
            assert untrusting.tls_error is not None
            assert "not signed by a CA in broker.ca_file" in untrusting.tls_error
            assert str(stranger.ca_file) in untrusting.tls_error
        finally:
            untrusting.stop()
            gc.collect()  # collect paho's leaked socket here, under this test's filter


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder


def test_a_station_and_its_outbox_relay_deliver_over_tls(tmp_path: Path) -> None:
    tls = make_ca_and_server(tmp_path)
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        receipter = Receipter(broker.url, ca_file=tls.ca_file)
        try:
            config = station_config(
                tmp_path / "station", broker.url, automation="full", max_parts=20,
                broker__ca_file=tls.ca_file,
            )
            agent = Agent(config)
            assert isinstance(agent.relay, RelayProcess)
            assert agent.run() == 0
            stored = receipter.stored["press-01"]
            decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
            assert len(decisions) == 20 and sorted(stored) == list(range(len(stored)))
        finally:
            receipter.close()
        with StationStore(tmp_path / "station") as store:
            assert store.outbox_depth() == 0, "the relay got every receipt over TLS"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("certificate", "said"),
    [
        ({"valid_from": timedelta(days=-30), "valid_until": timedelta(days=-1)},
         "its certificate has expired, or this device's clock is ahead"),
        ({"valid_from": timedelta(days=1), "valid_until": timedelta(days=30)},
         "not valid yet: this device's clock is probably behind"),
        ({"names": ("line-server.example",)},
         "its certificate is not issued for '127.0.0.1'"),
    ],
    ids=["expired", "not-yet-valid", "another-host"],
)
def test_a_certificate_the_station_cannot_accept_is_a_fault_that_says_why(
    tmp_path: Path, certificate: dict[str, Any], said: str
) -> None:
    """The station keeps inspecting; its screen and metrics say what to fix, and the fault
    clears once the broker's certificate is fixed (here: the broker restarted with a good
    one), without restarting the station."""
    bad = make_ca_and_server(_fresh(tmp_path / "bad"), **certificate)
    port = free_port()
    with tls_station(tmp_path, port, bad.ca_file) as agent:
        with start_broker(tmp_path / "broker", tls=bad, port=port):
            wait_for(lambda: "broker_tls" in agent.faults, 30, "the broker_tls fault")
            message = agent.faults["broker_tls"].message
            assert said in message and f"127.0.0.1:{port}" in message, message
            inspected = agent.parts_inspected
            wait_for(lambda: agent.parts_inspected > inspected + 5, 30, "inspection going on")
        renewed = issue_server(_fresh(tmp_path / "renewed"), bad.ca_file)
        with start_broker(tmp_path / "broker-fixed", tls=renewed, port=port):
            wait_for(lambda: "broker_tls" not in agent.faults, 30, "the fault to clear")
            wait_for(lambda: agent.link.connected, 10, "the station connected")


def test_a_broker_certificate_that_expires_soon_is_an_advisory_fault(tmp_path: Path) -> None:
    """Read at every TLS connect: a fault that stops no rollout (deploy.rollout's advisory
    faults), shown until the certificate is renewed, while the station works as usual."""
    soon = make_ca_and_server(tmp_path, valid_until=timedelta(days=5))
    port = free_port()
    with tls_station(tmp_path, port, soon.ca_file) as agent:
        with start_broker(tmp_path / "broker", tls=soon, port=port):
            wait_for(lambda: "broker_cert_expiring" in agent.faults, 30, "the advisory fault")
            message = agent.faults["broker_cert_expiring"].message
            assert message.startswith(f"the broker's certificate (127.0.0.1:{port}) expires on ")
            assert message.endswith("in 5 days: renew it before then"), message
            assert agent.link.connected, "nothing is wrong yet"
            assert "broker_cert_expiring" in ADVISORY_FAULTS
        renewed = issue_server(
            _fresh(tmp_path / "renewed"), soon.ca_file, valid_until=timedelta(days=365)
        )
        with start_broker(tmp_path / "broker-renewed", tls=renewed, port=port):
            wait_for(lambda: "broker_cert_expiring" not in agent.faults, 30, "the fault to clear")


@contextlib.contextmanager
def tls_station(tmp_path: Path, port: int, ca_file: Path) -> Iterator[Agent]:
    """A station inspecting, its broker at mqtts://127.0.0.1:`port` trusted through `ca_file`
    (a broker may come and go there meanwhile); stopped at the end."""
    config = station_config(
        tmp_path / "station", f"mqtts://127.0.0.1:{port}", broker__ca_file=ca_file,
        broker__backoff_max_s=1.0, outbox__relay="thread", outbox__receipt_wait_s=0.2,
    )
    try:
        with agent_running(config) as agent:
            yield agent
    finally:
        gc.collect()  # collect paho's leaked sockets here, under the test's filter


def issue_client(folder: Path, ca_file: Path, **validity: timedelta) -> TlsFiles:
    """A client certificate (for the name "station") that the CA in `ca_file` signs."""
    return issue_server(_fresh(folder), ca_file, names=("station",), **validity)


# paho-mqtt leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(("client", "said"), [
    # The broker's alert names the cause (read after the handshake under TLS 1.3) ...
    ("expired", "the broker refuses this device's client certificate ({cert}): it has expired, "
     "or the broker's clock is ahead: renew it (SSLV3_ALERT_CERTIFICATE_EXPIRED)"),
    # ... or the broker closes the connection before the client reads one.
    ("other_ca", "({cert})"),
    ("none", "set broker.cert_file and broker.key_file"),
])
def test_a_client_certificate_the_broker_refuses_is_a_tls_error_that_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, client: str, said: str
) -> None:
    """A broker that requires client certificates refuses one under TLS 1.3 only after the
    handshake: the link still says so, names the certificate, and logs it once, not at every
    retry."""
    tls = dataclasses.replace(make_ca_and_server(tmp_path), require_client_cert=True)
    mine: TlsFiles | None = None
    if client == "expired":
        mine = issue_client(tmp_path / "client", tls.ca_file, valid_from=timedelta(days=-30),
                            valid_until=timedelta(days=-1))
    elif client == "other_ca":
        other = make_ca_and_server(_fresh(tmp_path / "other"))
        mine = issue_client(tmp_path / "client", other.ca_file)
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        link = MqttLink(LinkConfig(
            url=broker.url, client_id="tls-client-cert", ca_file=tls.ca_file,
            cert_file=mine.cert_file if mine else None, key_file=mine.key_file if mine else None,
            backoff_min_s=0.2, backoff_max_s=0.5,
        ))
        with caplog.at_level(logging.DEBUG, logger="linesight.mqtt"):
            link.start()
            try:
                expected = said.format(cert=mine.cert_file if mine else "")
                wait_for(lambda: expected in (link.tls_error or ""), 20, f"{expected!r}")
                attempts = link.connect_attempts
                wait_for(lambda: link.connect_attempts >= attempts + 3, 20, "more attempts")
                assert not link.connected
                assert expected in (link.tls_error or "")
                assert (link.tls_error or "").startswith(
                    f"TLS with the broker 127.0.0.1:{broker.port} failed: ")
            finally:
                link.stop()
                gc.collect()
    # Logged when the reason changes, not at every retry: once, or twice where an attempt that
    # read the broker's alert follows one that did not (which attempt reads it is a race).
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(r.name == "linesight.mqtt" and "cannot connect" in r.getMessage()
               for r in loud), [r.getMessage() for r in loud]
    assert 1 <= len(loud) <= 2 < link.connect_attempts - 1


# paho-mqtt leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_station_whose_client_certificate_expired_has_a_fault_that_says_so(
    tmp_path: Path,
) -> None:
    tls = dataclasses.replace(make_ca_and_server(tmp_path), require_client_cert=True)
    mine = issue_client(tmp_path / "client", tls.ca_file, valid_from=timedelta(days=-30),
                        valid_until=timedelta(days=-1))
    port = free_port()
    config = station_config(
        tmp_path / "station", f"mqtts://127.0.0.1:{port}", broker__ca_file=tls.ca_file,
        broker__cert_file=mine.cert_file, broker__key_file=mine.key_file,
        broker__backoff_max_s=1.0, outbox__relay="thread", outbox__receipt_wait_s=0.2,
    )
    with start_broker(tmp_path / "broker", tls=tls, port=port), agent_running(config) as agent:
        wait_for(lambda: "broker_tls" in agent.faults
                 and "it has expired" in agent.faults["broker_tls"].message, 30,
                 "the broker_tls fault naming the expired client certificate")
        assert str(mine.cert_file) in agent.faults["broker_tls"].message
        inspected = agent.parts_inspected
        wait_for(lambda: agent.parts_inspected > inspected + 5, 30, "inspection going on")
    gc.collect()


# paho-mqtt leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_renewed_client_certificate_is_used_at_the_next_connect_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The station's certificate expired, so the broker refuses it; a technician copies the
    renewed one over it (first a broken copy). The link connects by itself."""
    tls = dataclasses.replace(make_ca_and_server(tmp_path), require_client_cert=True)
    mine = issue_client(tmp_path / "client", tls.ca_file, valid_from=timedelta(days=-30),
                        valid_until=timedelta(days=-1))
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        link = MqttLink(LinkConfig(
            url=broker.url, client_id="tls-renewal", ca_file=tls.ca_file,
            cert_file=mine.cert_file, key_file=mine.key_file, backoff_min_s=0.2,
            backoff_max_s=0.5,
        ))
        with caplog.at_level(logging.INFO, logger="linesight.mqtt"):
            link.start()
            try:
                wait_for(lambda: "it has expired" in (link.tls_error or ""), 20, "the refusal")
                mine.cert_file.write_text("not a certificate\n")  # a copy gone wrong
                wait_for(lambda: any("cannot be used" in r.getMessage() for r in caplog.records),
                         20, "the broken files logged")
                assert not link.connected and "it has expired" in (link.tls_error or "")
                renewed = issue_client(tmp_path / "renewed", tls.ca_file,
                                       valid_until=timedelta(days=365))
                mine.key_file.write_bytes(renewed.key_file.read_bytes())
                mine.cert_file.write_bytes(renewed.cert_file.read_bytes())
                assert link.wait_connected(20), link.tls_error
                assert link.tls_error is None
                # The renewed certificate's expiry is read: a year away, no warning.
                assert "this client's certificate" not in (link.cert_warning or "")
            finally:
                link.stop()
                gc.collect()
    said = [r.getMessage() for r in caplog.records if "TLS files changed" in r.getMessage()]
    assert said[0].startswith("mqtt link tls-renewal: the TLS files changed, but cannot be "
                              f"used, so the ones loaded before stay in use: cert_file "
                              f"{mine.cert_file}")
    assert said[-1] == "mqtt link tls-renewal: the TLS files changed; loaded them again"


def test_a_client_certificate_renewed_before_it_expires_ends_the_warning(tmp_path: Path) -> None:
    tls = dataclasses.replace(make_ca_and_server(tmp_path, valid_until=timedelta(days=365)),
                              require_client_cert=True)
    mine = issue_client(tmp_path / "client", tls.ca_file, valid_until=timedelta(days=5))
    with start_broker(tmp_path / "broker", tls=tls) as broker:
        link = MqttLink(LinkConfig(url=broker.url, client_id="tls-warned", ca_file=tls.ca_file,
                                   cert_file=mine.cert_file, key_file=mine.key_file))
        link.start()
        try:
            assert link.wait_connected(10), link.tls_error
            assert (link.cert_warning or "").startswith(
                f"this client's certificate ({mine.cert_file}) expires on ")
            renewed = issue_client(tmp_path / "renewed", tls.ca_file,
                                   valid_until=timedelta(days=365))
            mine.key_file.write_bytes(renewed.key_file.read_bytes())
            mine.cert_file.write_bytes(renewed.cert_file.read_bytes())
            assert link.cert_warning is None
            assert link.connected, "the connection goes on"
        finally:
            link.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_password_the_broker_refuses_over_tls_is_no_tls_error(
    tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake went well and the broker answered CONNECT with a refusal: the link says
    the credentials were refused, and does not send the technician after client certificates."""
    tls = make_ca_and_server(tmp_path)
    right = secrets.token_urlsafe(16)
    passwords = write_password_file(tmp_path / "passwd", {"agent": right})
    with start_broker(tmp_path / "broker", tls=tls, password_file=passwords) as broker:
        link = MqttLink(LinkConfig(
            url=broker.url, client_id="tls-wrong-password", ca_file=tls.ca_file,
            username="agent", password=right + "x", protocol=protocol,
            backoff_min_s=0.1, backoff_max_s=0.2, refused_retry_s=0.5,
        ))
        with caplog.at_level(logging.DEBUG, logger="linesight.mqtt"):
            link.start()
            try:
                wait_for(lambda: link.connect_attempts >= 3, 20, "three refused attempts")
                assert "refused client 'tls-wrong-password'" in (link.fatal_error or "")
                assert link.tls_error is None
            finally:
                link.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "linesight.mqtt"]
    assert not [m for m in said if "TLS with the broker" in m], said
