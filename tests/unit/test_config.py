"""Station and controller configuration: a typo stops start-up with the key's path."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from deploy.config import load_controller_config
from edge_agent.config import load_config
from linesight.cli import UsageError, agent_config, build_parser, main, parse_settings
from linesight.config_file import ConfigError
from linesight.protocol import DeploymentMode

STATION = """
station: press-01
broker: {url: "mqtt://127.0.0.1:1883"}
source: "synthetic:"
active: models/part-classifier/1.0.0
data_dir: /tmp/press-01
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(text)
    return path


def test_a_valid_file_loads_and_flags_win(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, STATION), {"automation": "full"})
    assert config.station == "press-01" and config.automation == "full"
    assert config.broker.client_id == "linesight-agent-press-01"
    config = load_config(write(tmp_path, STATION), {"broker.url": "mqtts://line:8883"})
    assert config.broker.url == "mqtts://line:8883"


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("automaton: full\n", "automaton"),
        ("inference: {timeout_ms: -1}\n", "inference.timeout_ms"),
        ("outbox: {max_row: 5}\n", "outbox.max_row"),
        ("outbox: {relay: fork}\n", "outbox.relay"),
        ("inference: {candidate_nice: 20}\n", "inference.candidate_nice"),
        ("mode: canary\ncandidate: models/part-classifier/2.0.0\n", "canary_fraction"),
        ("mode: shadow\n", "needs a candidate"),
        ("reject_output: {type: webhook, url: ftp://x}\n", "reject_output.webhook.url"),
    ],
)
def test_bad_keys_and_values_name_the_path(tmp_path: Path, extra: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, STATION + extra), {})
    assert where in str(caught.value)
    assert "station.yaml" in str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    ("station: [unclosed", "not valid YAML"),
    ("- a list\n- of things\n", "mapping"),
])
def test_unreadable_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", {})


def test_flags_alone_are_enough_and_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"station": "press-01"})
    for key in ("broker", "source", "active", "data_dir"):
        assert key in str(caught.value)


def test_controller_configuration(tmp_path: Path) -> None:
    config = load_controller_config(None, {
        "broker.url": "mqtt://127.0.0.1:1883", "data_dir": tmp_path, "bundles": tmp_path,
    })
    assert config.broker.client_id == "linesight-fleet-controller" and config.http_port == 8700
    with pytest.raises(ConfigError, match="api_token"):
        load_controller_config(None, {"broker.url": "mqtt://h:1", "data_dir": tmp_path,
                                      "bundles": tmp_path, "api_token": "short"})


def test_set_flags_reach_every_key_with_yaml_values(tmp_path: Path) -> None:
    settings = parse_settings([
        "inference.timeout_ms=500", "outbox.relay=thread",
        "inference.providers=[CPUExecutionProvider]",
        "reject_output={type: webhook, url: 'http://plc:8080/reject'}", "labels.line=L2",
    ])
    config = load_config(write(tmp_path, STATION), settings)
    assert config.inference.timeout_ms == 500 and config.outbox.relay == "thread"
    assert config.inference.providers == ["CPUExecutionProvider"]
    assert config.reject_output.type == "webhook" and config.labels == {"line": "L2"}


@pytest.mark.parametrize(
    "setting", ["timeout_ms", "=5", "inference..timeout_ms=5", "a=[unclosed"]
)
def test_a_malformed_set_flag_is_refused(setting: str) -> None:
    with pytest.raises(UsageError, match="--set"):
        parse_settings([setting])


def test_a_set_flag_naming_an_unknown_key_stops_the_agent_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["agent", "--config", str(write(tmp_path, STATION)),
                 "--set", "inference.timeout_msec=5"])
    assert code == 2
    assert "inference.timeout_msec" in capsys.readouterr().err


def test_the_controller_takes_set_flags_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["fleet", "serve", "--broker", "mqtt://127.0.0.1:1883", "--data-dir",
                 str(tmp_path), "--bundles", str(tmp_path), "--set", "offline_after_sec=60"])
    assert code == 2
    assert "offline_after_sec" in capsys.readouterr().err


def test_the_shipped_example_configurations_are_valid() -> None:
    examples = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
    station = load_config(examples / "station.yaml.example", {})
    assert station.command_key == Path("/etc/linesight/command.pub")
    # Valid once its placeholder token is replaced; refused as shipped, so nobody runs with it.
    with pytest.raises(ConfigError, match="api_token: .*placeholder"):
        load_controller_config(examples / "controller.yaml.example", {})
    controller = load_controller_config(examples / "controller.yaml.example",
                                        {"api_token": "0123456789abcdef0123"})
    assert controller.command_key == Path("/etc/linesight/command.key")


def agent_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["agent", *argv])


def test_set_null_clears_a_key_of_the_file_and_flags_not_given_change_nothing(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, STATION + "candidate: models/part-classifier/2.0.0\nmode: shadow\n"
                 "metrics_port: 9101\n")
    config = agent_config(agent_args(
        "--config", str(path), "--set", "candidate=null", "--set", "metrics_port=null",
        "--set", "mode=null", "--mode", "none",  # the named flag wins over --set
    ))
    assert config.candidate is None and config.metrics_port is None
    assert config.mode == DeploymentMode.NONE
    # --station, --broker, --active, --candidate... were not given: the file's values stand
    assert config.station == "press-01" and config.broker.url == "mqtt://127.0.0.1:1883"
    assert config.active == Path("models/part-classifier/1.0.0")


@pytest.mark.parametrize("key", ["station", "active", "broker.url", "data_dir"])
def test_set_null_on_a_required_key_is_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    args = agent_args("--config", str(write(tmp_path, STATION)), "--set", f"{key}=null")
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(key)}: ") as caught:
        agent_config(args)
    assert "station configuration" in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        # A "keep forever" written as infinity, or as a number of days no date reaches, would
        # make every pruning pass fail: nothing would ever be pruned.
        ("history_days: .inf\n", "history_days"),
        ("history_days: 1000000\n", "history_days"),
        ("review: {retention_days: .inf}\n", "review.retention_days"),
        ("review: {retention_days: 1.0e+7}\n", "review.retention_days"),
        # A socket refuses an infinite time-out: every deploy_candidate would fail unanswered.
        ("download_timeout_s: .inf\n", "download_timeout_s"),
        ("download_timeout_s: 1.0e+12\n", "download_timeout_s"),
        ("inference: {timeout_ms: .nan}\n", "inference.timeout_ms"),
        ("outbox: {receipt_wait_s: .inf}\n", "outbox.receipt_wait_s"),
        ("thresholds: {ok: 1.5}\n", "thresholds.ok"),
        ("thresholds: {defect: .nan}\n", "thresholds.defect"),
    ],
)
def test_values_no_clock_or_socket_can_use_are_refused_with_the_path(
    tmp_path: Path, extra: str, where: str
) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(where)}: "):
        load_config(write(tmp_path, STATION + extra), {})


def test_long_but_usable_periods_are_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, STATION + "history_days: 36500\n"
                               "review: {retention_days: 3650}\ndownload_timeout_s: 600\n"), {})
    assert config.history_days == 36500 and config.review.retention_days == 3650


def test_a_bad_source_option_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  source_options\.rate_hz: "):
        load_config(write(tmp_path, STATION + "source_options: {rate_hz: -1}\n"), {})
    with pytest.raises(ConfigError, match=r"(?m)^  source_options\.rate: "):
        load_config(write(tmp_path, STATION + "source_options: {rate: 5}\n"), {})


def test_a_source_folder_that_does_not_exist_stops_the_agent_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, STATION.replace("/tmp/press-01", str(tmp_path / "data")))
    code = main(["agent", "--config", str(path), "--source", f"folder:{tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "source" in err and "not a directory" in err
    assert "Traceback" not in err
