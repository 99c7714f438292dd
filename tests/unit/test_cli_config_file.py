"""`linesight agent --config FILE` and `linesight fleet serve --config FILE` with a file that
cannot be a configuration: each is refused with exit status 2 and a message naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from linesight.cli import main


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve"]])
@pytest.mark.parametrize(("content", "expected"), [
    (b"\xff\xfe station: s1\n", "is not UTF-8 text"),
    (b"- a\n- b\n", "must hold a mapping of keys, not list"),
    (b"station: [\n", "is not valid YAML"),
])
def test_a_config_file_that_is_not_a_configuration_is_named(
    command: list[str], content: bytes, expected: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "station.yaml"
    config.write_bytes(content)
    assert main([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"error: {config} {expected}" in err


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve"]])
def test_a_yaml_error_names_the_line_but_does_not_repeat_it(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line of a YAML mistake may hold the broker's password; the message goes to the
    journal, so it says where the mistake is, not what the line says."""
    config = tmp_path / "station.yaml"
    config.write_text('broker:\n  url: mqtt://line-server:1883\n  password: "s3cret-pw\n')
    assert main([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"error: {config} is not valid YAML: line 3, column 13: while scanning a quoted " \
           "scalar" in err
    assert "s3cret" not in err


def test_a_config_path_that_is_a_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["agent", "--config", str(tmp_path)]) == 2
    assert f"error: cannot read {tmp_path}: Is a directory" in capsys.readouterr().err


def test_a_flag_fills_a_section_whose_keys_are_all_commented_out(tmp_path: Path) -> None:
    # `broker:` with every key under it commented out is null in YAML: `--broker` still sets
    # broker.url, as it would with no `broker:` line at all.
    from edge_agent.config import load_config

    config = tmp_path / "station.yaml"
    config.write_text("station: s1\nsource: synthetic:seed=1\nactive: models/part-classifier/"
                      "1.0.0\nbroker:\n  # url: mqtt://line-server:1883\n")
    loaded = load_config(config, {"broker.url": "mqtt://127.0.0.1:1884",
                                  "data_dir": tmp_path / "data"})
    assert loaded.broker.url == "mqtt://127.0.0.1:1884"
    assert loaded.broker.client_id == "linesight-agent-s1"


def test_a_flag_below_a_key_that_holds_a_value_is_refused_naming_it(tmp_path: Path) -> None:
    from linesight.config_file import ConfigError, set_path

    with pytest.raises(ConfigError, match="broker.url: broker is not a mapping"):
        set_path({"broker": "mqtt://x"}, "broker.url", "mqtt://y")
