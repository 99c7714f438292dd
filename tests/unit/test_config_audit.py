"""A station or controller YAML edited by hand, or a flag typed at the line PC: every mistake
stops start-up with exit status 2, the key (or flag) and the reason, no traceback, and no
secret repeated."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from linesight.cli import agent_config, build_parser, main
from linesight.config_file import ConfigError, load_yaml, make_data_dir, make_folder

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "models" / "part-classifier" / "1.0.0"
V2 = REPO / "models" / "part-classifier" / "2.0.0"
SECRET = "s3cret-Pw"  # noqa: S105 - a made-up password no message may repeat


def station_yaml(data_dir: Path) -> str:
    return (f"station: press-01\nbroker:\n  url: mqtt://127.0.0.1:1\n  username: press-01\n"
            f"  password: {SECRET}\nsource: 'synthetic:'\nactive: {V1}\ndata_dir: {data_dir}\n")


def controller_yaml(data_dir: Path) -> str:
    return f"broker: {{url: 'mqtt://127.0.0.1:1'}}\ndata_dir: {data_dir}\nbundles: {REPO}/models\n"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, once it has refused to start (exit status 2).

    Should it start instead, it ends by itself: a station after one part (unless the file sets
    max_parts), a controller in its own process, stopped after a minute (a failed test)."""
    if argv[0] == "fleet":
        done = subprocess.run(  # noqa: S603 - our own entry point
            [sys.executable, "-m", "linesight.cli", *argv], capture_output=True, text=True,
            timeout=60, check=False,
        )
        status, err = done.returncode, done.stderr
    else:
        config = Path(argv[argv.index("--config") + 1]) if "--config" in argv else None
        bounded = "max_parts" in " ".join(argv) or (
            config is not None and config.is_file() and "max_parts" in config.read_text())
        status = main([*argv, "--receipt-wait", "0", *([] if bounded else ["--max-parts", "1"])])
        err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and SECRET not in err, err
    return err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the file itself -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve"]])
def test_a_key_written_twice_is_refused_naming_it_and_both_lines(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyYAML keeps the last of two equal keys: an `automation: full` further down silently
    won over the one the engineer just edited."""
    base = station_yaml(tmp_path / "d") if command == ["agent"] else controller_yaml(tmp_path)
    config = write(tmp_path, base + "topic_prefix: plant/a\ntopic_prefix: plant/b\n")
    err = run([*command, "--config", str(config)], capsys)
    line = len(base.splitlines()) + 2
    assert f"{config} is not valid YAML: line {line}, column 1: duplicate key " \
           f"'topic_prefix' (first on line {line - 1})" in err


def test_a_key_written_twice_inside_a_section_is_refused_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, station_yaml(tmp_path / "d") + "outbox:\n  max_rows: 500\n"
                   "  relay: thread\n  max_rows: 5000\n")
    assert "duplicate key 'max_rows' (first on line" in run(["agent", "--config", str(config)],
                                                           capsys)


def test_a_merge_key_may_still_be_overridden_by_the_mapping_itself(tmp_path: Path) -> None:
    config = write(tmp_path, station_yaml(tmp_path / "d") +
                   "x-defaults: &defaults {timeout_ms: 500, active_threads: 2}\n"
                   "inference:\n  <<: *defaults\n  timeout_ms: 800\n")
    from linesight.config_file import read_yaml_mapping

    assert read_yaml_mapping(config)["inference"] == {"timeout_ms": 800, "active_threads": 2}


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve"]])
def test_a_file_far_larger_than_any_configuration_is_refused_unparsed(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config` pointed at a log or a recording: PyYAML took 14 s per 5 MB, all in memory."""
    config = tmp_path / "config.yaml"
    config.write_text("labels:\n" + "".join(f"  k{i}: v{i}\n" for i in range(200_000)))
    err = run([*command, "--config", str(config)], capsys)
    assert f"{config} is larger than 1 MiB: not a configuration file" in err


def test_an_alias_bomb_is_refused_by_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = 'x-a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for name, previous in zip("bcdefghij", "abcdefghi", strict=True):
        bomb += f"x-{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    config = write(tmp_path, bomb + "labels: *j\n")
    err = run(["agent", "--config", str(config)], capsys)
    assert re.search(r"(?m)^  labels: Input should be a valid dictionary", err), err


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve"]])
def test_an_empty_file_names_every_required_key(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run([*command, "--config", str(write(tmp_path, ""))], capsys)
    for key in ("broker", "data_dir"):
        assert re.search(rf"(?m)^  {key}: Field required", err), err


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "flag", "key"), [
    # YAML 1.1 reads yes, on and true alike: audit_fraction: yes was 1.0, every part audited
    ("audit_fraction: yes", "audit_fraction=yes", "audit_fraction"),
    ("canary_fraction: on", "canary_fraction=on", "canary_fraction"),
    ("max_parts: true", "max_parts=true", "max_parts"),
    ("metrics_port: yes", "metrics_port=yes", "metrics_port"),
    ("inference: {timeout_ms: true}", "inference.timeout_ms=true", "inference.timeout_ms"),
    ("storage: {min_free_mb: off}", "storage.min_free_mb=off", "storage.min_free_mb"),
])
def test_true_or_false_for_a_number_is_refused_naming_the_key(
    setting: str, flag: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = rf"(?m)^  {re.escape(key)}: .*a number, not true or false"
    config = write(tmp_path, station_yaml(tmp_path / "d") + setting + "\n")
    err = run(["agent", "--config", str(config)], capsys)
    assert re.search(expected, err), err
    config = write(tmp_path, station_yaml(tmp_path / "d"))
    err = run(["agent", "--config", str(config), "--set", flag], capsys)
    assert re.search(expected, err), err


@pytest.mark.parametrize("setting", ["http_port=yes", "tick_s=on", "min_free_mb=true"])
def test_the_controller_refuses_true_or_false_for_a_number(
    setting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run(["fleet", "serve", "--config", str(write(tmp_path, controller_yaml(tmp_path))),
               "--set", setting], capsys)
    key = setting.partition("=")[0]
    assert re.search(rf"(?m)^  {key}: .*a number, not true or false", err), err


@pytest.mark.parametrize("key", ["data_dir", "active", "key", "command_key"])
def test_an_empty_path_is_refused_not_taken_as_the_working_directory(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data_dir: ""` was Path("."): the station's store went into whatever folder the agent
    was started from."""
    text = station_yaml(tmp_path / "d")
    text = re.sub(rf"(?m)^{key}: .*$", f'{key}: ""', text) if f"\n{key}:" in text \
        else text + f'{key}: ""\n'
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        err = run(["agent", "--config", str(write(tmp_path, text))], capsys)
    finally:
        os.chdir(cwd)
    assert re.search(rf"(?m)^  {key}: .*empty path", err), err
    assert not (tmp_path / "station.db").exists()


@pytest.mark.parametrize("key", ["data_dir", "bundles", "key"])
def test_the_controller_refuses_an_empty_path(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run(["fleet", "serve", "--config", str(write(tmp_path, controller_yaml(tmp_path))),
               "--set", f"{key}="], capsys)
    assert re.search(rf"(?m)^  {key}: .*empty path", err), err


@pytest.mark.parametrize("flag", ["--data-dir", "--active", "--candidate", "--key",
                                  "--command-key"])
def test_an_empty_path_flag_is_refused_naming_the_flag(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, station_yaml(tmp_path / "d"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["agent", "--config", str(config), flag, "", "--max-parts", "1",
                  "--receipt-wait", "0"])
    finally:
        os.chdir(cwd)
    assert stopped.value.code == 2
    assert f"argument {flag}: an empty path" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--canary-fraction", "0.2"],
    ["--canary-fraction", "0.2", "--mode", "shadow", "--candidate", str(V2)],
    ["--set", "canary_fraction=0.2", "--mode", "blue_green", "--candidate", str(V2)],
])
def test_a_canary_fraction_without_canary_mode_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engineer meant a share of parts for the candidate: in any other mode it decides none
    (or all), so the fraction is a mistake, not a setting to ignore."""
    config = write(tmp_path, station_yaml(tmp_path / "d"))
    err = run(["agent", "--config", str(config), *argv], capsys)
    assert "canary_fraction is only used with mode 'canary'" in err


def test_a_canary_fraction_with_canary_mode_is_taken(tmp_path: Path) -> None:
    config = write(tmp_path, station_yaml(tmp_path / "d"))
    loaded = agent_config(build_parser().parse_args([
        "agent", "--config", str(config), "--mode", "canary", "--candidate", str(V2),
        "--canary-fraction", "0.2"]))
    assert loaded.canary_fraction == 0.2


@pytest.mark.parametrize("password", [f"'{SECRET}", f"{SECRET}: x: y", f"@{SECRET}"])
def test_a_set_value_that_is_not_yaml_is_refused_without_repeating_it(
    password: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyYAML's message quotes the line it could not read: here, the broker's password."""
    config = write(tmp_path, station_yaml(tmp_path / "d"))
    err = run(["agent", "--config", str(config), "--set", f"broker.password={password}"],
              capsys)
    assert "--set broker.password: the value is not valid YAML: line 1, column" in err


# --- paths start-up must use -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["agent"], ["fleet", "serve", "--http-port", "0"]])
def test_a_data_dir_that_is_a_file_is_refused_naming_the_key(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    base = station_yaml(a_file) if command == ["agent"] else controller_yaml(a_file)
    err = run([*command, "--config", str(write(tmp_path, base))], capsys)
    assert f"data_dir {a_file}: is a file, not a folder" in err
    base = station_yaml(a_file / "d") if command == ["agent"] else controller_yaml(a_file / "d")
    err = run([*command, "--config", str(write(tmp_path, base))], capsys)
    assert f"data_dir {a_file / 'd'}: cannot create it: Not a directory" in err


@pytest.fixture
def read_only_folder() -> Iterator[Path]:
    """A folder nobody but root may write in, world-readable (pytest's tmp_path is not)."""
    folder = Path(tempfile.mkdtemp(prefix="linesight-ro-"))
    try:
        (folder / "ro").mkdir(mode=0o555)
        (folder / "ro").chmod(0o555)
        folder.chmod(0o755)
        yield folder / "ro"
    finally:
        (folder / "ro").chmod(0o755)
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()


@pytest.mark.parametrize("where", ["data", ""])
def test_a_data_dir_on_a_read_only_path_is_refused_naming_the_key(
    where: str, read_only_folder: Path
) -> None:
    """As an unprivileged user (root writes anywhere), as the station's uid would be: a child
    of this process that gave up root, so no interpreter has to be readable by that user."""
    data_dir = read_only_folder / where if where else read_only_folder
    reading, writing = os.pipe()
    with warnings.catch_warnings():  # the child only checks a folder and exits
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        said = b"no error"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            make_data_dir(data_dir)
        except ConfigError as exc:
            said = str(exc).encode()
        finally:
            os.write(writing, said)
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        said_text = pipe.read().decode()
    os.waitpid(pid, 0)
    expected = (f"data_dir {data_dir}: cannot create it: Permission denied" if where else
                f"data_dir {data_dir}: cannot write in it")
    assert expected in said_text


def test_a_bundles_path_that_is_no_folder_stops_the_controller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, controller_yaml(tmp_path / "fleet"))
    a_file = tmp_path / "bundles.txt"
    a_file.write_text("")
    err = run(["fleet", "serve", "--config", str(config), "--http-port", "0",
               "--bundles", str(a_file)], capsys)
    assert f"bundles {a_file}: is a file, not a folder" in err
    err = run(["fleet", "serve", "--config", str(config), "--http-port", "0",
               "--bundles", str(a_file / "models")], capsys)
    assert f"bundles {a_file / 'models'}: cannot create it: Not a directory" in err


def test_a_missing_bundles_folder_is_made_empty(tmp_path: Path) -> None:
    """The shipped controller.yaml.example names data_dir/bundles, which no install step makes:
    a first start makes it rather than failing (and restarting for ever under systemd)."""
    make_folder(tmp_path / "fleet" / "bundles", "bundles")
    assert (tmp_path / "fleet" / "bundles").is_dir()
    make_folder(tmp_path / "fleet" / "bundles", "bundles")  # there already: nothing to do


def test_a_merge_of_a_mapping_that_itself_merges_and_overrides_loads_as_yaml_reads_it() -> None:
    """A mapping merged elsewhere may be flattened before it is built itself: its own override
    is not a key written twice."""
    text = ("base: &base {a: 1, url: x}\nstations:\n  line1: &l1\n    <<: *base\n    a: 2\n"
            "line2:\n  <<: *l1\n")
    import yaml

    assert load_yaml(text) == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError, match="duplicate key 'a'"):
        load_yaml(text.replace("    a: 2\n", "    a: 2\n    a: 3\n"))


def test_an_http_host_that_is_not_an_address_names_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, controller_yaml(tmp_path / "fleet"))
    err = run(["fleet", "serve", "--config", str(config), "--http-port", "0",
               "--http-host", "no-such-host.invalid", "--set", "api_token=" + "0123456789" * 3],
              capsys)
    assert "cannot serve the API on no-such-host.invalid:0: " in err


def test_a_metrics_port_in_use_stops_the_agent_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(  # noqa: S603 - our own entry point
            [sys.executable, "-m", "linesight.cli", "agent",
             "--config", str(write(tmp_path, station_yaml(tmp_path / "d"))),
             "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 2, done.stderr
    assert f"metrics_port: cannot serve metrics on port {port}: Address already in use" in \
        done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stderr


# --- a leading ~ -----------------------------------------------------------------------------


def test_a_path_starting_with_a_tilde_is_in_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No shell reads the YAML (nor --flag=~/x): `data_dir: ~/linesight` made a folder named
    ~ in the folder the agent was started from."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = station_yaml(tmp_path / "d").replace(f"data_dir: {tmp_path / 'd'}",
                                                "data_dir: ~/linesight")
    loaded = agent_config(build_parser().parse_args(
        ["agent", "--config", str(write(tmp_path, text)), "--key=~/site.pub"]))
    assert loaded.data_dir == tmp_path / "home" / "linesight"
    assert loaded.key == tmp_path / "home" / "site.pub"
    from edge_agent.sources import parse_spec

    assert parse_spec("folder:~/parts").target == str(tmp_path / "home" / "parts")


def test_a_tilde_naming_no_user_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = station_yaml(tmp_path / "d").replace(f"data_dir: {tmp_path / 'd'}",
                                                "data_dir: ~no-such-user-4711/linesight")
    err = run(["agent", "--config", str(write(tmp_path, text))], capsys)
    assert re.search(r"(?m)^  data_dir: .*no user 'no-such-user-4711' on this machine", err), err
    with pytest.raises(ValueError, match="no user 'no-such-user-4711'"):
        from edge_agent.sources import parse_spec

        parse_spec("folder:~no-such-user-4711/parts")
