"""The station's configuration: one YAML file, every key overridable by a flag, validated at
start-up so a typo is an error naming the key, never a silent default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.sources import SourceOptions
from edge_agent.writer import DEFAULT_MAX_BACKLOG
from linesight.config_file import ConfigPath, Count, Number, load_model
from linesight.disk_space import MAX_FLOOR_MB
from linesight.mqtt import LinkConfig
from linesight.protocol import STATION_ID_PATTERN, AutomationLevel, DeploymentMode

# The longest period a station keeps its history: a date that far back still exists.
MAX_DAYS = 36_500
MAX_MIN_FREE_MB = MAX_FLOOR_MB


class Strict(BaseModel):
    # Infinity and NaN are refused everywhere: no clock, socket or pruning pass can use them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InferenceConfig(Strict):
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference; CPU is the fallback",
    )
    active_threads: Count = Field(default=1, ge=1, le=64)
    candidate_threads: Count = Field(default=1, ge=1, le=64)
    timeout_ms: Number = Field(
        default=1000, gt=0, description="an inference slower than this is a fault (fail-safe)"
    )
    candidate_queue: Count = Field(
        default=4, ge=1, le=1024, description="parts waiting for the candidate; beyond, skipped"
    )
    candidate_nice: Count = Field(
        default=10, ge=0, le=19,
        description="how much lower the candidate worker's CPU priority is (Linux nice steps): "
        "when the CPU is short, the active model gets it first and the candidate skips parts",
    )


class OutboxConfig(Strict):
    max_rows: Count = Field(default=100_000, ge=100)
    receipt_wait_s: Number = Field(
        default=15.0, ge=0, description="--max-parts: how long to wait for receipts before exit"
    )
    publish_batch: Count = Field(default=200, ge=1, le=10_000)
    publish_linger_ms: Number = Field(
        default=10.0, ge=0, le=1000,
        description="after a commit wakes the relay, wait this long so that what the next "
        "parts commit goes in the same batch: fewer publish rounds and receipts at a line "
        "rate, for at most this much more delivery latency (0: publish at once)",
    )
    resend_after_s: Number = Field(
        default=10.0, gt=0,
        description="published but not receipted for this long: publish again (e.g. a broker "
        "restart lost the controller's session)",
    )
    relay: Literal["process", "thread"] = Field(
        default="process",
        description="where outbox rows are published and receipts applied: a child process "
        "with its own MQTT connection (keeps MQTT work off the inspection loop), or a thread",
    )


class ReviewConfig(Strict):
    quota_mb: Number = Field(default=512, gt=0)
    retention_days: Number = Field(default=7, gt=0, le=MAX_DAYS)
    jpeg_quality: Count = Field(default=90, ge=30, le=100)


class StorageConfig(Strict):
    min_free_mb: Number = Field(
        default=1024, ge=0, le=MAX_MIN_FREE_MB,
        description="free space to keep on the data dir's file system: below it, the disk_low "
        "fault warns while there is still room (0: no fault; the free space is still measured)",
    )
    write_queue: Count = Field(
        default=DEFAULT_MAX_BACKLOG, ge=10, le=100_000,
        description="messages, review items and part log entries waiting for the disk (about "
        "three per part); when this many wait (a disk that hangs), the station takes no part "
        "until the disk catches up, with the store_stalled fault",
    )


class LogRejectOutput(Strict):
    type: Literal["log"] = "log"


class WebhookRejectOutput(Strict):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    timeout_s: Number = Field(default=2.0, gt=0, le=30)

    @field_validator("url")
    @classmethod
    def _usable(cls, value: str) -> str:
        # Said at start-up: at the first part it would only be a failed signal per part.
        if any(c.isspace() or not c.isprintable() or not c.isascii() for c in value):
            raise ValueError("a space, control or non-ASCII character in the URL: write it "
                             "percent-encoded")
        parts = urlsplit(value)
        if "@" in parts.netloc:
            raise ValueError("a user name or password in the URL is not sent: the POST needs "
                             "an address the gateway takes without one")
        if not parts.hostname:
            raise ValueError("the URL needs a host: http://HOST[:PORT]/PATH")
        try:
            parts.port  # noqa: B018 - raises for what is not a port number
        except ValueError:
            raise ValueError("the address is not HOST[:PORT] (a port is a number up to 65535)"
                             ) from None
        return value


RejectOutputConfig = Annotated[LogRejectOutput | WebhookRejectOutput, Field(discriminator="type")]


class AgentConfig(Strict):
    station: str = Field(pattern=STATION_ID_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)
    broker: LinkConfig
    topic_prefix: str = "linesight/v1"
    source: str = Field(
        min_length=1, description="camera:0 | rtsp(s)://… | http(s)://… | video:PATH | folder:PATH"
    )
    source_options: SourceOptions = Field(default_factory=SourceOptions)
    active: ConfigPath
    candidate: ConfigPath | None = None
    mode: DeploymentMode = DeploymentMode.NONE
    canary_fraction: Number = Field(default=0.0, ge=0, le=1)
    automation: AutomationLevel = AutomationLevel.PARTIAL
    audit_fraction: Number = Field(default=0.02, ge=0, le=1)
    thresholds: dict[str, Annotated[Number, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="per-label confidence thresholds over the manifest's"
    )
    data_dir: ConfigPath
    max_parts: Count | None = Field(default=None, ge=1)
    metrics_port: Count | None = Field(default=None, ge=0, le=65535)
    key: ConfigPath | None = Field(
        default=None, description="public key bundles must be signed with")
    command_key: ConfigPath | None = Field(
        default=None,
        description="the controller's public command key: when set, a command without a valid "
        "signature is refused with an error ack",
    )
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    reject_output: RejectOutputConfig = Field(default_factory=LogRejectOutput)
    metrics_interval_s: Number = Field(default=10, gt=0)
    state_interval_s: Number = Field(default=30, gt=0)
    drift_window: Count = Field(default=500, ge=50, description="sampled parts per drift window")
    drift_sample_every: Count = Field(default=4, ge=1, description="one part in N feeds drift")
    download_timeout_s: Number = Field(default=30, gt=0, le=3600)
    history_days: Number = Field(
        default=30, gt=0, le=MAX_DAYS,
        description="part log, command log and UI requests are kept this long",
    )

    @model_validator(mode="after")
    def _coherent(self) -> AgentConfig:
        if self.mode != DeploymentMode.NONE and self.candidate is None:
            raise ValueError(f"mode {self.mode.value!r} needs a candidate bundle")
        if self.mode == DeploymentMode.CANARY and self.canary_fraction <= 0:
            raise ValueError("mode 'canary' needs canary_fraction > 0")
        if self.mode != DeploymentMode.CANARY and self.canary_fraction > 0:
            # The share of parts meant for the candidate: in any other mode it decides none
            # (or, blue-green, all), so the fraction is a mistake, not a setting to ignore.
            raise ValueError(f"canary_fraction is only used with mode 'canary' (mode is "
                             f"{self.mode.value!r}): set mode: canary, or leave it out")
        return self


def _client_id(document: dict[str, Any]) -> None:
    broker = document.get("broker")
    if isinstance(broker, dict) and "client_id" not in broker and "station" in document:
        broker["client_id"] = f"linesight-agent-{document['station']}"


def load_config(path: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """YAML file (optional) with flag overrides on top (dotted keys, e.g. 'broker.url')."""
    return load_model(AgentConfig, "station configuration", path, overrides, _client_id)
