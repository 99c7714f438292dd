"""mqtts:// end to end: a mosquitto TLS listener with a CA made by the test."""

from __future__ import annotations

import gc
import ipaddress
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.agent import Agent
from edge_agent.relay import RelayProcess
from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.broker import TlsFiles, start_broker
from linesight.mqtt import LinkConfig, MqttLink, ReceivedMessage
from tests.support import Receipter, station_config


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(folder: Path) -> TlsFiles:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("linesight test CA"))
        .issuer_name(_name("linesight test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        ), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return files


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
