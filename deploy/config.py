"""The fleet controller's configuration: YAML plus flags, validated at start-up."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from linesight.config_file import ConfigPath, Count, Number, load_model
from linesight.disk_space import MAX_FLOOR_MB
from linesight.mqtt import LinkConfig

MAX_MIN_FREE_MB = MAX_FLOOR_MB
MAX_RETENTION_DAYS = 36_500
"""A hundred years: a date that far back still exists (a longer one made the prune fail)."""


class ControllerConfig(BaseModel):
    # No key takes .inf or .nan: "for ever" is not a retention, nor a silence before offline.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    broker: LinkConfig
    topic_prefix: str = "linesight/v1"
    data_dir: ConfigPath
    http_host: str = "127.0.0.1"
    http_port: Count = Field(default=8700, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, pattern=r"^https?://", validate_default=True,
        description="base URL stations use to reach this controller (bundle downloads)",
    )
    bundles: ConfigPath = Field(description="folder of model bundles: <name>/<version>/")
    key: ConfigPath | None = Field(
        default=None, description="public key bundles must be signed with before a rollout"
    )
    command_key: ConfigPath | None = Field(
        default=None,
        description="Ed25519 private key (PEM) every command is signed with; stations that hold "
        "its public key refuse commands without a valid signature",
    )
    command_ttl_s: Number = Field(
        default=3600, gt=0, le=7 * 86400,
        description="every command carries expires_at = sent + this; a station refuses it later "
        "(a command queued for an offline station goes stale; a captured one cannot be replayed "
        "once the station has forgotten its cmd_id)",
    )
    api_token: str | None = Field(
        default=None, min_length=16, validate_default=True,
        description="when set, every request that changes something needs this bearer token; "
        "required when http_host is reachable from other machines",
    )
    tick_s: Number = Field(default=1.0, gt=0, le=60)
    offline_after_s: Number = Field(
        default=120.0, gt=0, description="a station silent for this long counts as offline"
    )
    ingest_batch: Count = Field(default=1000, ge=1, le=100_000)
    retention_days: Number = Field(
        default=30, gt=0, le=MAX_RETENTION_DAYS,
        description="receipted messages older than this are pruned hourly",
    )
    min_free_mb: Count = Field(
        default=2048, ge=0, le=MAX_MIN_FREE_MB,
        description="free space (MB of 1 048 576 bytes) under data_dir below which the "
        "controller warns (log, /api/health, /metrics, dashboard); 0 turns the check off",
    )

    @field_validator("public_url")
    @classmethod
    def _stations_can_reach_it(cls, url: str | None, info: ValidationInfo) -> str | None:
        # Without it the bundle URL is made of http_host, and 0.0.0.0 or :: is no address a
        # station can download from: every deploy_candidate would fail at the station.
        host = info.data.get("http_host", "127.0.0.1")
        if url is None and is_unspecified(host):
            raise ValueError(
                f"is required with http_host {host} (every address of this machine): the URL "
                "stations download bundles from, e.g. http://line-server:8700"
            )
        return url

    @field_validator("api_token")
    @classmethod
    def _token_guards_a_reachable_api(cls, token: str | None, info: ValidationInfo) -> str | None:
        if token is not None and token.strip().lower() in EXAMPLE_TOKENS:
            raise ValueError("is still the example's placeholder: set a random one, e.g. the "
                             "output of `openssl rand -hex 24`")
        host = info.data.get("http_host", "127.0.0.1")
        if token is None and not is_loopback(host):
            raise ValueError(
                f"is required with http_host {host}: anyone who can reach that address could "
                "start, approve or abort rollouts (or listen on 127.0.0.1 only)"
            )
        return token


# The placeholders the shipped examples and the README show.
EXAMPLE_TOKENS = frozenset({"replace-with-32-random-characters", "a long random string"})


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name, without a port) is this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """Whether `host` means every address of this machine (0.0.0.0, ::), which no other
    machine can connect to."""
    host = host.strip("[]")
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _client_id(document: dict[str, Any]) -> None:
    broker = document.get("broker")
    if isinstance(broker, dict):
        broker.setdefault("client_id", "linesight-fleet-controller")


def load_controller_config(path: Path | None, overrides: dict[str, Any]) -> ControllerConfig:
    return load_model(ControllerConfig, "controller configuration", path, overrides, _client_id)
