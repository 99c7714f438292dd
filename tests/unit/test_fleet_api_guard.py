"""A controller API that others can reach is never without a token, and a tokenless one on
127.0.0.1 refuses requests a web page elsewhere could make a browser here send (DNS rebinding)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deploy.api import _host_name, create_app
from deploy.config import ControllerConfig
from deploy.controller import Controller
from linesight.http_server import HttpServer
from linesight.mqtt import LinkConfig

pytestmark = pytest.mark.unit


def config(tmp_path: Path, **values: Any) -> ControllerConfig:
    return ControllerConfig(
        broker=LinkConfig(url="mqtt://127.0.0.1:1", client_id="unit-guard"),
        data_dir=tmp_path / "fleet", bundles=tmp_path / "bundles", **values,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "line-server", "::"])  # noqa: S104
def test_an_api_others_can_reach_needs_a_token(tmp_path: Path, host: str) -> None:
    url = {"public_url": "http://line-server:8700"}
    with pytest.raises(ValidationError, match=r"api_token\n.*is required with http_host"):
        config(tmp_path, http_host=host, **url)
    assert config(tmp_path, http_host=host, api_token="x" * 32, **url).api_token == "x" * 32


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])  # noqa: S104
def test_every_address_needs_the_url_stations_download_from(tmp_path: Path, host: str) -> None:
    """http://0.0.0.0:8700/bundles/... in a deploy_candidate: a station connects to itself."""
    with pytest.raises(ValidationError, match=r"public_url\n.*is required with http_host"):
        config(tmp_path, http_host=host, api_token="x" * 32)
    assert config(tmp_path, http_host=host, api_token="x" * 32,
                  public_url="http://line-server:8700").public_url == "http://line-server:8700"


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", "http://127.0.0.1:{port}"), ("::1", "http://[::1]:{port}"),
    ("localhost", "http://localhost:{port}"),
])
def test_the_bundle_url_names_the_port_bound_and_brackets_an_ipv6_address(
    tmp_path: Path, host: str, expected: str
) -> None:
    """With http_port 0 the server takes a free port: the URL stations get must name it, not 0
    (every download went to port 0)."""
    if host == "::1":
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", 0))
            except OSError:
                pytest.skip("this machine has no IPv6 loopback")
    controller = Controller(config(tmp_path, http_host=host, http_port=0))
    try:
        server = HttpServer(create_app(controller), host, 0)
        controller.http_port = server.port
        try:
            assert server.port != 0
            assert controller.public_url == expected.format(port=server.port)
            assert server.url == expected.format(port=server.port)
        finally:
            server.stop()
    finally:
        controller.store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_an_api_on_this_machine_only_may_go_without(tmp_path: Path, host: str) -> None:
    assert config(tmp_path, http_host=host).api_token is None


@pytest.mark.parametrize("token", ["replace-with-32-random-characters", "a long random string"])
def test_the_examples_placeholder_token_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        config(tmp_path, http_host="0.0.0.0", api_token=token)  # noqa: S104


@pytest.mark.parametrize(("header", "name"), [
    ("127.0.0.1:8700", "127.0.0.1"), ("localhost", "localhost"), ("[::1]:8700", "::1"),
    ("[::1]", "::1"), ("evil.example:8700", "evil.example"),
])
def test_host_names(header: str, name: str) -> None:
    assert _host_name(header) == name


def test_a_tokenless_api_refuses_a_request_for_another_host(tmp_path: Path) -> None:
    controller = Controller(config(tmp_path))
    try:
        client = create_app(controller).test_client()
        answer = client.post("/api/rollouts/current/pause", json={},
                             headers={"Host": "rebound.example:8700"})
        assert answer.status_code == 403
        assert "rebound.example" in answer.get_json()["error"]
        # The same request addressed to this machine gets through the guard (no rollout: 404).
        answer = client.post("/api/rollouts/current/pause", json={},
                             headers={"Host": "127.0.0.1:8700"})
        assert answer.status_code == 404 and "no rollout" in answer.get_json()["error"]
    finally:
        controller.store.close()
