"""Broker URLs and link config: a typo is a clear error at start-up, not a silent default."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from linesight.broker import TlsFiles
from linesight.mqtt import BrokerAddress, LinkConfig, MqttLink, parse_broker_url, topic_matches
from tests.integration.test_mqtt_tls import make_ca_and_server


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883, False)),
        ("mqtts://broker.plant.local:8883", BrokerAddress("broker.plant.local", 8883, True)),
        ("MQTT://Broker:1884/", BrokerAddress("broker", 1884, False)),
        ("mqtt://broker", BrokerAddress("broker", 1883, False)),
        ("mqtts://broker", BrokerAddress("broker", 8883, True)),
        ("mqtt://[::1]:1883", BrokerAddress("::1", 1883, False)),
    ],
)
def test_good_urls_parse(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected
    host, port, tls = parse_broker_url(url)
    assert (host, port, tls) == tuple(expected)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://broker:1883", "scheme 'http'"),
        ("broker:1883", "scheme 'broker'"),
        ("//broker:1883", "scheme none"),
        ("mqtt://:1883", "host is missing"),
        ("mqtt://broker:port", "port 'port'"),
        ("mqtt://broker:70000", "port '70000'"),
        ("mqtt://broker:0", "port 0"),
        ("mqtt://user:secret@broker:1883", "credentials"),
        ("mqtt://broker:1883/linesight", "path"),
        ("mqtt://broker:1883?x=1", "query"),
    ],
)
def test_bad_urls_name_the_bad_part(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as raised:
        parse_broker_url(url)
    assert names in str(raised.value)


def test_config_defaults_are_durable() -> None:
    config = LinkConfig(url="mqtt://127.0.0.1:1883", client_id="station-01")
    assert config.protocol == "5"
    assert config.clean_start is False
    assert config.keepalive == 30
    assert (config.backoff_min_s, config.backoff_max_s) == (0.5, 30)


def test_config_refuses_unknown_key() -> None:
    with pytest.raises(ValidationError, match="keep_alive"):
        LinkConfig.model_validate(
            {"url": "mqtt://127.0.0.1:1883", "client_id": "station-01", "keep_alive": 10}
        )


def test_config_is_frozen() -> None:
    config = LinkConfig(url="mqtt://127.0.0.1:1883", client_id="station-01")
    with pytest.raises(ValidationError):
        config.keepalive = 5


def test_config_bad_url_error_names_url_field() -> None:
    with pytest.raises(ValidationError) as raised:
        LinkConfig(url="tcp://127.0.0.1:1883", client_id="station-01")
    error = raised.value.errors()[0]
    assert error["loc"] == ("url",)
    assert "mqtt:// or mqtts://" in error["msg"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ca_file": "/etc/ca.pem"}, "not mqtts://"),
        ({"url": "mqtts://broker:8883", "key_file": "/k.pem"}, "cert_file is not"),
        ({"password": "x"}, "username is not"),
        ({"backoff_min_s": 10, "backoff_max_s": 1}, "backoff_min_s"),
        ({"client_id": ""}, "client_id"),
        ({"protocol": "3.1"}, "protocol"),
    ],
)
def test_config_cross_field_rules(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"url": "mqtt://broker:1883", "client_id": "station-01"}
    values.update(fields)
    with pytest.raises(ValidationError, match=message):
        LinkConfig.model_validate(values)


def test_mqtts_without_ca_file_is_allowed() -> None:
    config = LinkConfig(url="mqtts://broker:8883", client_id="station-01")
    assert config.address.tls


def test_password_is_not_in_repr() -> None:
    password = secrets.token_urlsafe(12)
    config = LinkConfig(
        url="mqtt://broker:1883", client_id="station-01", username="agent", password=password
    )
    assert password not in repr(config)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("linesight/v1/stations/+/state", "linesight/v1/stations/s1/state", True),
        ("linesight/v1/stations/+/state", "linesight/v1/stations/s1/cmd", False),
        ("linesight/v1/#", "linesight/v1/fleet/rollout", True),
        (
            "$share/controllers/linesight/v1/stations/+/decision",
            "linesight/v1/stations/s1/decision",
            True,
        ),
    ],
)
def test_topic_matches_uses_mqtt_wildcards(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def _tls_link(**files: Path) -> MqttLink:
    return MqttLink(LinkConfig(url="mqtts://broker:8883", client_id="station-01", **files))


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_ca_and_server(tmp_path)


def test_good_tls_files_build_a_link(tls_files: TlsFiles) -> None:
    _tls_link(ca_file=tls_files.ca_file, cert_file=tls_files.cert_file,
              key_file=tls_files.key_file).stop()


@pytest.mark.parametrize(("setting", "problem"), [
    ("ca_file", "missing"), ("ca_file", "not a certificate"), ("cert_file", "missing"),
    ("cert_file", "not a certificate"), ("key_file", "missing"), ("key_file", "not a key"),
])
def test_an_unusable_tls_file_is_an_error_naming_the_setting_and_the_file(
    tls_files: TlsFiles, tmp_path: Path, setting: str, problem: str
) -> None:
    files = {"ca_file": tls_files.ca_file, "cert_file": tls_files.cert_file,
             "key_file": tls_files.key_file}
    bad = tmp_path / "bad.pem"
    if problem != "missing":
        # A key where a certificate belongs, or a certificate where the key belongs.
        bad.write_bytes((tls_files.cert_file if problem == "not a key" else
                         tls_files.key_file).read_bytes())
    files[setting] = bad
    with pytest.raises(ValueError, match=rf"{setting} {re.escape(str(bad))}") as raised:
        _tls_link(**files)
    if problem == "missing":
        assert "No such file or directory" in str(raised.value)


def test_an_encrypted_key_file_is_an_error_not_a_passphrase_prompt(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(tls_files.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    with pytest.raises(ValueError, match=rf"key_file {re.escape(str(encrypted))}: .*encrypted"):
        _tls_link(ca_file=tls_files.ca_file, cert_file=tls_files.cert_file, key_file=encrypted)


@pytest.mark.parametrize("host", ["broker..plant", ".broker", "x" * 64, "ü" * 70])
def test_a_host_name_no_resolver_takes_is_refused_at_start_up(host: str) -> None:
    # Such a name makes the resolver raise UnicodeError, which would end the link's network
    # thread on its first connect: the link would never connect nor say why.
    with pytest.raises(ValueError, match="broker URL") as raised:
        LinkConfig(url=f"mqtt://{host}:1883", client_id="station-01")
    assert "not a valid host name" in str(raised.value)


@pytest.mark.parametrize("field", ["backoff_min_s", "backoff_max_s"])
def test_an_infinite_backoff_is_refused_naming_it(field: str) -> None:
    # With no upper bound the reconnect delay doubles for ever: after a long outage the link
    # would in effect stop trying. JSON (the relay's spec) has no infinity either.
    values = {"backoff_min_s": 0.5, "backoff_max_s": float("inf")}
    if field == "backoff_min_s":
        values = {"backoff_min_s": float("inf"), "backoff_max_s": float("inf")}
    with pytest.raises(ValidationError, match=field):
        LinkConfig(url="mqtt://127.0.0.1:1883", client_id="station-01", **values)
