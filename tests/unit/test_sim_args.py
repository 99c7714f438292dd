"""`linesight sim` refuses a mistake in its arguments with exit status 2, before it starts a
line."""

from __future__ import annotations

import pytest

from linesight.cli import main
from tests.support import V21

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("argument", "said"), [
    (["--rate", "nan"], "--rate must be a number > 0"),
    (["--rate", "0"], "--rate must be a number > 0"),
    (["--operator-error", "2"], "--operator-error must be between 0 and 1"),
    (["--operator-error", "nan"], "--operator-error must be between 0 and 1"),
    (["--timeout", "-1"], "--timeout must be a number of seconds > 0"),
    (["--timeout", "inf"], "--timeout must be a number of seconds > 0"),
    (["--stations", "0"], "--stations must be between 1 and 50"),
])
def test_a_bad_argument_exits_2_naming_it(
    argument: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--candidate", str(V21), *argument]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("argument", "said"), [
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**62)], "--seed must be between 0 and"),
    (["--rate", "20000"], "--rate must be a number > 0 and at most 10000"),
])
def test_a_seed_or_rate_no_station_takes_exits_2_naming_the_argument(
    argument: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--candidate", str(V21), *argument]) == 2
    err = capsys.readouterr().err
    assert said in err
    assert "source spec" not in err  # said before any station starts
